"""Export a trained detector: ONNX or TorchScript (the whole model), or the backbone alone via torch.export.

    python tools/export.py --config RUN/config.yaml --checkpoint RUN/last.pth --format onnx --out RUN/model.onnx
    python tools/export.py --config RUN/config.yaml --checkpoint RUN/last.pth --format torchscript --out RUN/model.ts
    python tools/export.py --config RUN/config.yaml --checkpoint RUN/last.pth --format torch_export --backbone-only \\
        --out RUN/backbone.pt2

Whole model (onnx, torchscript): input "image" float32 RGB [3, H, W] in 0..1, any H, W; the run's test resize,
normalisation and NMS happen inside; outputs "boxes" [N, 4] (x0, y0, x1, y1 in the input's pixels), "scores" [N],
"labels" [N] (1..K, the order of the data's categories). BatchNorms are folded into the convolutions.
Backbone only (torch_export): input RGB [N, 3, H, W] in 0..1, H and W multiples of 32 and >= 64; output
{stage: features};
load with torch.export.load(FILE).module().

Then the exported file runs on real images (--check-images, default: the first 4 of the run's val images), each at
its size and at 3/4 of it, against the PyTorch model: onnxruntime / the TorchScript module must give the same
labels and boxes within 1 px (the backbone: features within 1e-4). Otherwise the tool fails (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detection.predictor import DEFAULT_CONFIG  # noqa: E402
from detection.export import (NormalizedBackbone, build_exportable_detector, compare_detections,  # noqa: E402
                              export_backbone, export_onnx, export_torchscript)
from engine.images import read_image  # noqa: E402
from engine.trained import load_run_config  # noqa: E402

FORMATS = ("onnx", "torchscript", "torch_export")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


class ExportCheckFailed(RuntimeError):
    """The exported model does not reproduce the PyTorch model."""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the run's config.yaml")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the run's last.pth")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the file to write")
    parser.add_argument("--backbone-only", action="store_true", help="export the backbone (needs --format torch_export)")
    parser.add_argument("--check-images", nargs="+", type=Path, help="images to check the export on "
                                                                      "(default: the first 4 of the run's val images)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 11)")
    parser.add_argument("--score-thresh", type=float, help="bake a different score threshold into the export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if (args.format == "torch_export") != args.backbone_only:
        parser.error("--backbone-only goes with --format torch_export (and only with it): torch.export cannot follow "
                     "the detector's data-dependent proposal filtering and NMS; use onnx or torchscript for the whole model")
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists: pass --overwrite or another --out")

    cfg = load_run_config(args.config, DEFAULT_CONFIG)
    module = build_exportable_detector(cfg, args.checkpoint)
    if args.score_thresh is not None:
        module.model.roi_heads.score_thresh = args.score_thresh
    images = check_images(args.check_images, cfg.data)
    if not images:
        parser.error("no images to check the export on: pass --check-images")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings about Python-side constants that torchvision expects
        if args.format == "onnx":
            export_onnx(module, args.out, args.opset)
            run = onnx_runner(args.out)
        elif args.format == "torchscript":
            export_torchscript(module, args.out)
            run = torch.jit.load(str(args.out))
        else:
            backbone = NormalizedBackbone(module.model).eval()
            export_backbone(backbone, args.out)
            return check_backbone(backbone, torch.export.load(str(args.out)).module(), images, args.out)
    return check_detector(module, run, images, args.out, args.format)


def check_images(paths: list[Path] | None, data: Mapping[str, Any]) -> list[torch.Tensor]:
    """Float RGB [3, H, W] tensors of the given files / folders' images, or of the run's first 4 val images."""
    if paths is None:
        folder = Path(data.val.images if data.format == "coco" else Path(data.root) / "JPEGImages")
        paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:4] if folder.is_dir() else []
    files = [f for p in paths for f in (sorted(p.glob("*")) if p.is_dir() else [p]) if f.suffix.lower() in IMAGE_SUFFIXES]
    return [torch.from_numpy(read_image(f)).permute(2, 0, 1).float().div(255) for f in files]


def views(image: torch.Tensor) -> list[torch.Tensor]:
    """The image and a 3/4-size copy: a second H, W exercises the dynamic shapes."""
    small = F.interpolate(image[None], scale_factor=0.75, mode="bilinear", align_corners=False)[0]
    return [image, small.contiguous()]


def onnx_runner(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda image: session.run(None, {"image": image.numpy()})


@torch.no_grad()
def check_detector(module, run, images: list[torch.Tensor], out: Path, fmt: str) -> dict:
    results = []
    for image in images:
        for view in views(image):
            result = compare_detections(module(view), run(view))
            results.append({"size": list(view.shape[1:]), **result})
    report = summarize(results, fmt, out)
    if not report["passed"]:
        raise ExportCheckFailed(f"{out}: the {fmt} export does not reproduce the PyTorch model:\n"
                                + json.dumps([r for r in results if not r["passed"]], indent=1))
    return report


@torch.no_grad()
def check_backbone(backbone: NormalizedBackbone, exported, images: list[torch.Tensor], out: Path) -> dict:
    results = []
    for image in images:
        for view in views(image):
            h, w = (max(64, s // 32 * 32) for s in view.shape[1:])  # the exported program takes multiples of 32, >= 64
            batch = F.interpolate(view[None], size=(h, w), mode="bilinear", align_corners=False)
            reference, got = backbone(batch), exported(batch)
            diff = max(float((reference[k] - got[k]).abs().max() / reference[k].abs().max().clamp_min(1e-12))
                       for k in reference)
            results.append({"size": [h, w], "max_relative_diff": diff, "passed": diff <= 1e-4})
    report = summarize(results, "torch_export (backbone)", out)
    if not report["passed"]:
        raise ExportCheckFailed(f"{out}: the exported backbone does not reproduce PyTorch's features: {results}")
    return report


def summarize(results: list[dict], fmt: str, out: Path) -> dict:
    passed = all(r["passed"] for r in results)
    report = {"out": str(out), "format": fmt, "passed": passed, "checks": results}
    for key in ("max_box_diff_px", "max_score_diff", "max_relative_diff"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            report[key] = max(values)
    worst = ", ".join(f"{k} {report[k]:.3g}" for k in ("max_box_diff_px", "max_score_diff", "max_relative_diff")
                      if k in report)
    print(f"{fmt} export {'matches' if passed else 'DOES NOT MATCH'} PyTorch on {len(results)} image views ({worst}): "
          f"{out}")
    return report


if __name__ == "__main__":
    try:
        main()
    except ExportCheckFailed as error:
        sys.exit(f"EXPORT CHECK FAILED: {error}")
