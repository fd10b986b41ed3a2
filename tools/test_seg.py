"""Evaluate a segmentation checkpoint on the val split, optionally with multi-scale + flip inference.

    python tools/test_seg.py --config outputs/seg_default/config.yaml --checkpoint outputs/seg_default/last.pth
    python tools/test_seg.py --config ... --checkpoint ... eval.scales=[0.75,1.0,1.25] eval.flip=true --out ms.json
    torchrun --nproc_per_node=8 tools/test_seg.py --config ... --checkpoint ... device=cuda

Writes the metrics (mIoU, pixel_acc, mean_acc, IoU_per_class, acc_per_class) as JSON to --out
(default: test_metrics.json next to the checkpoint), and the evaluation page (docs/report.md) to --report
(default: a folder named after --out, test_metrics_report/).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.config import config_or_exit  # noqa: E402
from engine.distributed import cleanup, init_distributed, is_main_process  # noqa: E402
from engine.loop import amp_dtype, eval_loader  # noqa: E402
from engine.output import jsonable  # noqa: E402
from engine.trained import build_trained_model  # noqa: E402
from segmentation.build import (DEFAULT_CONFIG, build_dataset, check_classes, limit_samples,  # noqa: E402
                                prepare_synthetic)
from segmentation.evaluation import SegmentationEvaluator  # noqa: E402
from segmentation.inference import evaluate, report  # noqa: E402
from segmentation.models import build_segmentation_model  # noqa: E402
from segmentation.report import write_segmentation_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the run's config.yaml (or any seg config)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="last.pth written by tools/train_seg.py")
    parser.add_argument("--out", type=Path, help="metrics JSON (default: test_metrics.json next to the checkpoint)")
    parser.add_argument("--report", type=Path, help="folder of the evaluation page (default: named after --out, "
                                                    "e.g. test_metrics_report/); eval.report=false: no page")
    parser.add_argument("--report-images", type=int, metavar="N", help="images in its gallery (eval.report_images)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. eval.flip=true")
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, DEFAULT_CONFIG, args)
    out = args.out or args.checkpoint.with_name("test_metrics.json")
    report_dir = args.report or out.with_name(f"{out.stem}_report")
    if report_dir.resolve() == (args.checkpoint.parent / "report").resolve() or (args.report_images or 0) < 0:
        parser.error(f"--report {report_dir} is the training run's own report, or --report-images < 0")
    _, _, device = init_distributed(cfg.device)

    prepare_synthetic(cfg.data)
    val_set = build_dataset(cfg.data, "val")
    check_classes(cfg.model.num_classes, val_set)
    loader = eval_loader(limit_samples(val_set, cfg.data.val_limit), 1, cfg.data.num_workers)
    model = build_trained_model(build_segmentation_model, cfg.model, args.checkpoint).to(device)
    evaluator = SegmentationEvaluator(len(val_set.class_names), class_names=val_set.class_names)
    metrics = evaluate(model, loader, val_set.class_names, device, scales=cfg.eval.scales, flip=cfg.eval.flip,
                       amp_dtype=amp_dtype(cfg.train.amp, device), evaluator=evaluator)

    if is_main_process():
        report(metrics)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n")
        print(f"scales {list(cfg.eval.scales)}, flip {cfg.eval.flip}: metrics written to {out}")
        if cfg.eval.report:
            gallery = cfg.eval.report_images if args.report_images is None else args.report_images
            page = write_segmentation_report(report_dir, cfg=cfg, metrics=metrics, evaluator=evaluator, model=model,
                                             dataset=val_set, device=device, run_dir=args.checkpoint.parent,
                                             checkpoint=args.checkpoint, config_path=args.config, gallery_size=gallery,
                                             amp_dtype=amp_dtype(cfg.train.amp, device))
            print(f"evaluation report: {page}")
    cleanup()
    return metrics


if __name__ == "__main__":
    main()
