"""Whether an exported detector is the model users run: the file through its runtime (onnxruntime, TorchScript)
against the single-scale `Predictor` (the path predict.py and test_det.py take) on real images, each at its size
and at 3/4 of it; the exported backbone against PyTorch's features. tools/export.py writes the file, then calls
these; a mismatch is an `ExportCheckFailed` naming every image that differs."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from datafiles.images import image_to_tensor

from .export import NormalizedBackbone, compare_detections
from .predictor import Predictor, test_resize_sides


class ExportCheckFailed(RuntimeError):
    """The exported model does not reproduce the Predictor (or the backbone PyTorch's features)."""


def single_scale_predictor(cfg: DictConfig, checkpoint: Path, score_thresh: float | None) -> Predictor:
    """The Predictor of the run with test-time augmentation off: the export is single-scale."""
    if list(cfg.eval.scales) != [1.0] or cfg.eval.flip:
        print(f"note: the export is single-scale; the run's test-time augmentation (eval.scales="
              f"{list(cfg.eval.scales)}, eval.flip={cfg.eval.flip}) is not in it, and it is checked against the "
              "single-scale Predictor", file=sys.stderr)
    cfg = cfg.copy()
    OmegaConf.update(cfg, "eval.scales", [1.0])
    OmegaConf.update(cfg, "eval.flip", False)
    return Predictor(cfg, checkpoint, score_thresh=score_thresh)


def views(image: np.ndarray) -> list[np.ndarray]:
    """The image and a 3/4-size uint8 copy: a second H, W exercises the dynamic shapes."""
    height, width = image.shape[:2]
    small = (max(1, round(width * 0.75)), max(1, round(height * 0.75)))
    return [image, cv2.resize(image, small, interpolation=cv2.INTER_AREA)]


def onnx_runner(path: Path) -> Callable:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda image: session.run(None, {"image": image.numpy()})


@torch.no_grad()
def check_detector(predictor: Predictor, run: Callable, images: list[tuple[str, np.ndarray]], out: Path,
                   fmt: str, exported_module: Callable | None = None) -> dict:
    """Every image's views through the Predictor and the exported model, compared by `compare_detections`.
    Where they differ, `exported_module` (the module that was exported, run eagerly) tells an export error from
    float rounding: a file that equals its own module there differs from the Predictor only by the rounding of
    another convolution layout, tipping a near-tie in proposal selection or NMS."""
    checks = []
    for name, image in tqdm(images, desc=f"check {fmt}", unit="img", dynamic_ncols=True):
        for view in views(image):
            expected = predictor(view)
            got = run(image_to_tensor(view))
            result = compare_detections((expected.boxes, expected.scores, expected.labels), got,
                                        predictor.score_thresh)
            if not result["passed"] and exported_module is not None:
                own = compare_detections(tuple(exported_module(image_to_tensor(view))), got, predictor.score_thresh)
                result["equals_exported_module"] = own["passed"]
            checks.append({"image": name, "size": list(view.shape[:2]), **result})
    differing = sorted({c["image"] for c in checks if not c["passed"]}, key=[name for name, _ in images].index)
    distances = [c["max_box_diff_px"] for c in checks if c["max_box_diff_px"] is not None]
    test_size = list(test_resize_sides(predictor.cfg.data))
    report = {"out": str(out), "format": fmt, "test_size": test_size, "passed": not differing, "images": len(images),
              "images_equal": len(images) - len(differing), "views": len(checks), "differing": differing,
              "confident_detections": {"predictor": sum(c["confident"][0] for c in checks),
                                       "exported": sum(c["confident"][1] for c in checks)},
              "max_box_diff_px": max(distances, default=None), "checks": checks}
    print(f"{fmt} export {'matches' if report['passed'] else 'DOES NOT MATCH'} the Predictor at test size "
          f"{test_size[0]}/{test_size[1]} on {report['images_equal']} of {len(images)} images ({len(checks)} views; "
          f"confident detections: "
          f"{report['confident_detections']['predictor']} Predictor, {report['confident_detections']['exported']} "
          f"{fmt}; largest matched corner distance {report['max_box_diff_px'] or 0:.3g} px): {out}")
    if differing:
        failed = [c for c in checks if not c["passed"]]
        lines = [f"{c['image']} at {c['size'][0]}x{c['size'][1]} (HxW): unmatched {len(c['unmatched'][0])} of "
                 f"{c['confident'][0]} confident Predictor detections, {len(c['unmatched'][1])} of {c['confident'][1]} "
                 f"exported; first: {(c['unmatched'][0] or c['unmatched'][1])[0]}" for c in failed]
        if all(c.get("equals_exported_module") for c in failed):
            lines.append("On every one of these the exported file equals PyTorch running the exported module itself: "
                         "the difference is float32 rounding (its convolution layout or runtime's kernels against "
                         "the Predictor's channels_last ones) tipping a near-tie in proposal selection or NMS, not "
                         "an export error; such an image cannot be made equal (docs/export.md)")
        raise ExportCheckFailed(f"{out}: the {fmt} export does not reproduce the Predictor on {len(differing)} of "
                                f"{len(images)} images: {', '.join(differing)}\n" + "\n".join(lines))
    return report


@torch.no_grad()
def check_backbone(backbone: NormalizedBackbone, exported, images: list[tuple[str, np.ndarray]], out: Path) -> dict:
    results = []
    for name, image in images:
        for view in views(image):
            h, w = (max(64, s // 32 * 32) for s in view.shape[:2])  # the exported program takes multiples of 32, >= 64
            batch = F.interpolate(image_to_tensor(view)[None], size=(h, w), mode="bilinear", align_corners=False)
            reference, got = backbone(batch), exported(batch)
            diff = max(float((reference[k] - got[k]).abs().max() / reference[k].abs().max().clamp_min(1e-12))
                       for k in reference)
            results.append({"image": name, "size": [h, w], "max_relative_diff": diff, "passed": diff <= 1e-4})
    passed = all(r["passed"] for r in results)
    worst = max(r["max_relative_diff"] for r in results)
    print(f"torch_export backbone {'matches' if passed else 'DOES NOT MATCH'} PyTorch on {len(results)} image views "
          f"(max relative difference {worst:.3g}): {out}")
    if not passed:
        raise ExportCheckFailed(f"{out}: the exported backbone does not reproduce PyTorch's features: {results}")
    return {"out": str(out), "format": "torch_export (backbone)", "passed": passed, "max_relative_diff": worst,
            "checks": results}
