"""Evaluate a segmentation checkpoint on the val split, optionally with multi-scale + flip inference.

    python tools/test_seg.py --config outputs/seg_default/config.yaml --checkpoint outputs/seg_default/last.pth
    python tools/test_seg.py --config ... --checkpoint ... eval.scales=[0.75,1.0,1.25] eval.flip=true --out ms.json
    torchrun --nproc_per_node=8 tools/test_seg.py --config ... --checkpoint ... device=cuda

Writes the metrics (mIoU, pixel_acc, mean_acc, IoU_per_class) as JSON to --out
(default: test_metrics.json next to the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.config import config_or_exit  # noqa: E402
from engine.distributed import cleanup, init_distributed, is_main_process  # noqa: E402
from engine.loop import amp_dtype, eval_loader  # noqa: E402
from engine.output import jsonable  # noqa: E402
from segmentation.build import build_dataset, check_classes, first, prepare_synthetic  # noqa: E402
from segmentation.inference import evaluate, report  # noqa: E402
from segmentation.models import build_segmentation_model  # noqa: E402
from train_seg import DEFAULT_CONFIG  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the run's config.yaml (or any seg config)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="last.pth written by tools/train_seg.py")
    parser.add_argument("--out", type=Path, help="metrics JSON (default: test_metrics.json next to the checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.flip=true")
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, DEFAULT_CONFIG, args)
    _, _, device = init_distributed(cfg.device)

    prepare_synthetic(cfg.data)
    val_set = build_dataset(cfg.data, "val")
    check_classes(cfg.model.num_classes, val_set)
    loader = eval_loader(first(val_set, cfg.data.val_limit), 1, cfg.data.num_workers)
    model = build_segmentation_model(cfg.model).to(device)
    load_checkpoint(args.checkpoint, model=model, map_location=device)
    metrics = evaluate(model, loader, val_set.class_names, device, scales=cfg.eval.scales, flip=cfg.eval.flip,
                       amp_dtype=amp_dtype(cfg.train.amp, device))

    out = args.out or args.checkpoint.with_name("test_metrics.json")
    if is_main_process():
        report(metrics)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n")
        print(f"scales {list(cfg.eval.scales)}, flip {cfg.eval.flip}: metrics written to {out}")
    cleanup()
    return metrics


if __name__ == "__main__":
    main()
