"""Evaluate a detection checkpoint: ResDet's last.pth, or a torchvision Faster R-CNN state dict.

    python tools/test_det.py --config outputs/det_default/config.yaml --checkpoint outputs/det_default/last.pth
    # torchvision's published R50-FPN COCO weights (37.0 AP) through our model and evaluator:
    python tools/test_det.py --config configs/det/r50_fpn_coco.yaml --checkpoint fasterrcnn_resnet50_fpn_coco-258fb6c6.pth \
        --coco91 model.num_classes=90 data.min_size=[800]

Writes the metrics as JSON (default: test_metrics.json beside the checkpoint) and prints them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detection.build import build_dataset, build_evaluator, load_split, prepare_synthetic  # noqa: E402
from detection.datasets import collate  # noqa: E402
from detection.evaluation import CocoEvaluator, format_per_class_table  # noqa: E402
from detection.inference import evaluate  # noqa: E402
from detection.models import build_detector, load_detector_weights  # noqa: E402
from engine.config import config_or_exit  # noqa: E402
from engine.distributed import barrier, cleanup, init_distributed, is_main_process  # noqa: E402
from engine.loop import amp_dtype  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "det" / "default.yaml"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a run's config.yaml or any detection config")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="metrics JSON (default: test_metrics.json beside the checkpoint)")
    parser.add_argument("--coco91", action="store_true",
                        help="the model's labels are COCO category ids 1..90 (torchvision's COCO weights)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, DEFAULT_CONFIG, args)
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    out = args.out or args.checkpoint.with_name("test_metrics.json")
    if out.is_dir() or not out.parent.is_dir():  # checked now, not after the whole evaluation
        parser.error(f"--out {out}: {'is a folder' if out.is_dir() else f'folder {out.parent} does not exist'}; "
                     "give a file path in an existing folder")
    rank, world_size, device = init_distributed(cfg.device)

    if is_main_process():
        prepare_synthetic(cfg.data)  # the built-in demo data, if the config uses it (no-op once written)
    barrier()
    records, class_names, cat_ids = load_split(cfg.data, "val")
    dataset = Subset(build_dataset(cfg.data, records, train=False), range(rank, len(records), world_size))
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size, collate_fn=collate, num_workers=cfg.data.num_workers)
    model = build_detector(cfg.model).to(device)
    load_detector_weights(model, args.checkpoint)
    if args.coco91:
        evaluator = CocoEvaluator(cfg.data.val.annotations, list(range(1, 91)), backend=cfg.eval.backend)
    else:
        evaluator = build_evaluator(cfg.eval.metric, cfg.eval.backend, cfg.data, records, class_names, cat_ids)
    metrics = evaluate(model, loader, evaluator, device, amp_dtype=amp_dtype(cfg.train.amp, device))

    if is_main_process():
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        if "AP_per_class" in metrics:
            print(format_per_class_table(metrics["AP_per_class"]))
            print(f"mAP = {metrics['mAP']:.4f}")
        else:
            print("\n".join(f"{key:6s} {value:.4f}" for key, value in metrics.items()))
        print(f"written to {out}")
    cleanup()
    return metrics


if __name__ == "__main__":
    main()
