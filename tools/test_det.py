"""Evaluate a detection checkpoint: ResDet's last.pth, or a torchvision Faster R-CNN state dict.

    python tools/test_det.py --config outputs/det_default/config.yaml --checkpoint outputs/det_default/last.pth
    python tools/test_det.py --config ... --checkpoint ... eval.scales=[0.75,1.0,1.25] eval.flip=true  # TTA
    # torchvision's published R50-FPN COCO weights (37.0 AP) through our model and evaluator:
    python tools/test_det.py --config configs/det/r50_fpn_coco.yaml --checkpoint fasterrcnn_resnet50_fpn_coco-258fb6c6.pth \\
        --coco91 model.num_classes=90 data.min_size=[800]

Writes the metrics as JSON (default: test_metrics.json beside the checkpoint) with AP per class, and a
precision-recall curve per class (IoU 0.5) as pr_curves.png beside it, and prints them. With test-time
augmentation (`eval.scales`, `eval.flip`) the plain single-scale evaluation runs too and the gain is reported
under "tta". The evaluation page (docs/report.md) goes to --report (default: a folder named after --out,
test_metrics_report/).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detection.build import DEFAULT_CONFIG, build_dataset, build_evaluator, load_split, prepare_synthetic  # noqa: E402
from detection.datasets import collate  # noqa: E402
from detection.evaluation import CocoEvaluator, format_per_class_table  # noqa: E402
from detection.fast import optimize_for_inference  # noqa: E402
from detection.inference import evaluate  # noqa: E402
from detection.models import build_detector  # noqa: E402
from detection.quantize import calibration_batches, quantize_int8  # noqa: E402
from detection.report import write_detection_report  # noqa: E402
from engine.config import config_or_exit  # noqa: E402
from engine.distributed import barrier, cleanup, init_distributed, is_main_process  # noqa: E402
from engine.loop import amp_dtype, eval_loader  # noqa: E402
from engine.output import jsonable  # noqa: E402
from engine.trained import build_trained_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a run's config.yaml or any detection config")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, help="metrics JSON (default: test_metrics.json beside the checkpoint); "
                                                 "pr_curves.png goes beside it")
    parser.add_argument("--coco91", action="store_true",
                        help="the model's labels are COCO category ids 1..90 (torchvision's COCO weights)")
    parser.add_argument("--no-fast", action="store_true", help="run the model as trained (BN unfolded, NCHW) instead "
                                                               "of the faster equivalent form (detection.fast)")
    parser.add_argument("--compile", action="store_true", help="also compile backbone + FPN (pays off on long runs)")
    parser.add_argument("--int8", action="store_true", help="CPU: backbone + FPN, RPN conv and box head in int8 "
                        "(detection.quantize), calibrated on --calibration-images training images; not exact")
    parser.add_argument("--calibration-images", type=int, default=32, metavar="N",
                        help="with --int8: the first N training images set the activation ranges (default 32)")
    parser.add_argument("--report", type=Path, help="folder of the evaluation page (default: named after --out, "
                                                    "e.g. test_metrics_report/); eval.report=false: no page")
    parser.add_argument("--report-images", type=int, metavar="N", help="images in its gallery (eval.report_images)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, DEFAULT_CONFIG, args)
    if args.int8 and (args.no_fast or args.compile):
        parser.error("--int8 is its own fast form: it does not combine with --no-fast or --compile")
    if args.int8 and args.calibration_images < 1:
        parser.error(f"--calibration-images must be >= 1, got {args.calibration_images}")
    if not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    out = args.out or args.checkpoint.with_name("test_metrics.json")
    if out.is_dir() or not out.parent.is_dir():  # checked now, not after the whole evaluation
        parser.error(f"--out {out}: {'is a folder' if out.is_dir() else f'folder {out.parent} does not exist'}; "
                     "give a file path in an existing folder")
    report_dir = args.report or out.with_name(f"{out.stem}_report")
    if report_dir.resolve() == (args.checkpoint.parent / "report").resolve() or (args.report_images or 0) < 0:
        parser.error(f"--report {report_dir} is the training run's own report, or --report-images < 0")
    _, _, device = init_distributed(cfg.device)

    if is_main_process():
        prepare_synthetic(cfg.data)  # the built-in demo data, if the config uses it (no-op once written)
    barrier()
    records, class_names, cat_ids = load_split(cfg.data, "val")
    loader = eval_loader(build_dataset(cfg.data, records, train=False), cfg.eval.batch_size, cfg.data.num_workers,
                         collate_fn=collate)
    model = build_trained_model(build_detector, cfg.model, args.checkpoint)
    if args.int8:
        if device.type != "cpu":
            parser.error(f"--int8 runs on the CPU (device={cfg.device})")
        quantize_int8(model, calibration_batches(cfg.data, args.calibration_images, cfg.eval.batch_size))
    elif not args.no_fast:
        optimize_for_inference(model, compile=args.compile)
    model.to(device)

    def evaluate_at(scales: list[float], flip: bool) -> tuple[dict, CocoEvaluator]:
        if args.coco91:
            evaluator = CocoEvaluator(cfg.data.val.annotations, list(range(1, 91)), backend=cfg.eval.backend)
        else:
            evaluator = build_evaluator(cfg.eval.metric, cfg.eval.backend, cfg.data, records, class_names, cat_ids)
        metrics = evaluate(model, loader, evaluator, device, amp_dtype=amp_dtype(cfg.train.amp, device),
                           scales=scales, flip=flip)
        return metrics, evaluator

    tta = list(cfg.eval.scales) != [1.0] or cfg.eval.flip
    metrics, evaluator = evaluate_at(list(cfg.eval.scales), cfg.eval.flip)
    if tta:
        single, _ = evaluate_at([1.0], False)
        if is_main_process():
            key = "AP" if "AP" in metrics else "mAP"
            metrics["tta"] = {"scales": list(cfg.eval.scales), "flip": cfg.eval.flip, "metric": key,
                              "single_scale": single[key], "gain": metrics[key] - single[key]}

    if is_main_process():
        if args.int8:
            metrics["int8"] = {"calibration_images": args.calibration_images}
        out.write_text(json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n")
        plot = out.with_name("pr_curves.png")
        ap_key = "AP50_per_class" if "AP50_per_class" in metrics else "AP_per_class"  # COCO: AP at IoU .5
        plot_pr_curves(evaluator.pr_curves, metrics[ap_key], plot, ap_name=ap_key.removesuffix("_per_class"))
        print(format_per_class_table(metrics["AP_per_class"]))
        if "AP" in metrics:
            print("\n".join(f"{key:6s} {metrics[key]:.4f}" for key in metrics if isinstance(metrics[key], float)))
        else:
            print(f"mAP = {metrics['mAP']:.4f}")
        if tta:
            t = metrics["tta"]
            print(f"test-time augmentation (scales {t['scales']}, flip {t['flip']}): {t['metric']} "
                  f"{metrics[t['metric']]:.4f} vs {t['single_scale']:.4f} single-scale, gain {t['gain']:+.4f}")
        print(f"written to {out} and {plot}")
        if cfg.eval.report:
            gallery = cfg.eval.report_images if args.report_images is None else args.report_images
            page = write_detection_report(report_dir, cfg=cfg, metrics=metrics, evaluator=evaluator, records=records,
                                          run_dir=args.checkpoint.parent, checkpoint=args.checkpoint,
                                          config_path=args.config, gallery_size=gallery)
            print(f"evaluation report: {page}")
    cleanup()
    return metrics


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], ap: dict[str, float], path: Path,
                   ap_name: str = "AP") -> None:
    """One small precision-recall panel per class (IoU 0.5), titled with its AP, so weak classes stand out."""
    cols = min(len(curves), 5) or 1
    rows = max(1, math.ceil(len(curves) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, (name, (recall, precision)) in zip(axes.flat, curves.items()):
        valid = precision >= 0  # COCOeval: -1 beyond the reached recall / without ground truth
        ax.plot(recall[valid], precision[valid])
        value = ap.get(name, math.nan)
        ax.set_title(f"{name}: {'n/a' if math.isnan(value) else f'{100 * value:.1f}'}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("recall")
    for ax in axes[:, 0]:
        ax.set_ylabel("precision")
    fig.suptitle(f"precision-recall per class at IoU 0.5 (title: {ap_name}, %)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
