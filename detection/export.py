"""The whole detector as one exportable module: float32 RGB [3, H, W] in 0..1 -> boxes, scores, labels, the
same detections as `detection.Predictor` (single-scale).

ResDet's detector leaves resizing to its datasets (`NormalizeOnlyTransform`); for export the run's test resize
moves into the graph as tensor arithmetic that gives the datasets' output size for every input size
(`resized_size`: albumentations' float64 rule, not torchvision's `GeneralizedRCNNTransform`, whose float32 scale
and floor give other sizes: 650x417 -> 96x61 instead of 96x62) and the datasets' pixels (`opencv_linear_resize`:
OpenCV's fixed-point INTER_LINEAR on uint8, bit for bit). A float bilinear resize lands within a grey level of
OpenCV's on ~12 % of the pixels, which was enough to change the detections of 58 of the 200 raccoon images.

Where the detector ranks candidates (top-n, NMS) it gives one answer in eager PyTorch and in both traces
(`detection.ranking`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN

from backbones import fold_batchnorm
from engine.trained import build_trained_model, load_run_config

from .build import DEFAULT_CONFIG
from .fast import to_channels_last
from .models import build_detector
from .predictor import test_resize_sides

CONFIDENT = 0.3
"""`compare_detections`: every detection scoring at least this on one side must be found on the other..."""
PRESENT = 0.25
"""...as a detection of the same label scoring at least this (float rounding may move a score a little),"""
BOX_TOLERANCE_PX = 1.0
"""...whose corners are within this many pixels."""


def resized_size(size: Tensor, shortest: int, longest: int) -> Tensor:
    """The output (H, W) of the run's test resize (`detection.transforms.ResizeShortestEdge`) for an int64 (H, W),
    so that a traced graph computes it for any input size: scale = min(shortest / min(H, W), longest / max(H, W)),
    each side max(1, round(side * scale)) with round half to even, in float64, albumentations' arithmetic step for
    step (true divisions of the integers, not `reciprocal() * x`, which rounds differently). 1-d tensors
    throughout: the ONNX exporter computes divisions of 0-d float64 tensors in float32."""
    size = size.double()
    scale = torch.minimum(torch.full_like(size[:1], shortest) / size.amin(0, keepdim=True),
                          torch.full_like(size[:1], longest) / size.amax(0, keepdim=True))
    return (size * scale).round().clamp(min=1).long()


def _linear_taps(source: Tensor, target: Tensor, clamp_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    """OpenCV's INTER_LINEAR taps along one axis of `source` pixels resized to `target` (1-element int64
    tensors): the first source index of each output position and its two 11-bit fixed-point weights
    (`cv::resize`'s float computation, step for step: the half-pixel position in float64 rounded to float32, its
    floor, the weights 1 - f and f scaled by 2048 and rounded half to even). Along x, positions left / right of
    the image take the edge pixel with weight 2048; along y the weights stay and the rows are clamped (OpenCV
    treats the two axes differently)."""
    scale = torch.full_like(source, 1, dtype=torch.float64) / (target.double() / source.double())
    position = ((torch.arange(target[0], dtype=torch.float64) + 0.5) * scale - 0.5).float()
    first = torch.floor(position)
    fraction = position - first
    if clamp_weights:
        last = (source - 1).float()
        fraction = torch.where((first < 0) | (first >= last), torch.zeros_like(fraction), fraction)
        first = first.clamp(min=0).minimum(last)
    weights = torch.round((1 - fraction) * 2048).double(), torch.round(fraction * 2048).double()
    return first.long(), *weights


def opencv_linear_resize(image: Tensor, size: Tensor) -> Tensor:
    """`cv2.resize(uint8, INTER_LINEAR)` bit for bit on [C, H, W] float64 tensors holding 0..255 integers: the
    horizontal pass in 11-bit fixed point, the vertical pass as OpenCV's SIMD kernel computes it, on every
    pixel (((h0 >> 4) * b0 >> 16) + ((h1 >> 4) * b1 >> 16) + 2) >> 2, saturated to 0..255. An exact 2x
    reduction (OpenCV's area shortcut) and the same size (a copy) come out of the same arithmetic. Float64
    holds every intermediate exactly (< 2^31), and the shifts are floors of divisions by powers of two, so
    ONNX and TorchScript run the same integers. Checked against the installed OpenCV (5.0 here) by
    tests/test_export.py, so an OpenCV whose arithmetic changes fails there."""
    source = torch._shape_as_tensor(image)[-2:]
    source_height, source_width = source[:1], source[1:]
    column, a0, a1 = _linear_taps(source_width, size[1:], clamp_weights=True)
    row, b0, b1 = _linear_taps(source_height, size[:1], clamp_weights=False)
    next_column = (column + 1).minimum(source_width - 1)
    rows = image.index_select(2, column) * a0 + image.index_select(2, next_column) * a1
    top = rows.index_select(1, row.clamp(min=0).minimum(source_height - 1))
    bottom = rows.index_select(1, (row + 1).clamp(min=0).minimum(source_height - 1))
    b0, b1 = b0[:, None], b1[:, None]
    mixed = torch.floor(torch.floor(top / 16) * b0 / 65536) + torch.floor(torch.floor(bottom / 16) * b1 / 65536)
    return torch.floor((mixed + 2) / 4).clamp(0, 255)


class InGraphTestResize(nn.Module):
    """float RGB [3, H, W] in 0..1 -> the run's test resize of it, bit for bit the Predictor's: the image taken
    at 8 bits (round(x * 255), what the Predictor's uint8 images are), `resized_size`, `opencv_linear_resize`,
    then / 255 in float32 as `datafiles.images.image_to_tensor` divides."""

    def __init__(self, shortest: int, longest: int) -> None:
        super().__init__()
        self.shortest, self.longest = shortest, longest

    def forward(self, image: Tensor) -> Tensor:
        size = torch._shape_as_tensor(image)[-2:]  # a tensor while tracing: the exported graph keeps H, W dynamic
        pixels = torch.round(image.double() * 255).clamp(0, 255)
        return opencv_linear_resize(pixels, resized_size(size, self.shortest, self.longest)).float() / 255


class ExportableDetector(nn.Module):
    """One image in, (boxes [N, 4] x0 y0 x1 y1 in the input's pixels, scores [N], labels [N] 1..K) out: the
    run's test resize, the detector, the boxes mapped back as `detection.inference.to_original_size` does."""

    def __init__(self, model: FasterRCNN, shortest: int, longest: int) -> None:
        super().__init__()
        self.resize = InGraphTestResize(shortest, longest)
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        resized = self.resize(image)
        out = self.model([resized])[0]
        original, new = torch._shape_as_tensor(image)[-2:].double(), torch._shape_as_tensor(resized)[-2:].double()
        ratio = (original / new).float().flip(0)  # (x, y): float64 quotients cast to float32, as the Predictor's
        return out["boxes"] * ratio.repeat(2), out["scores"], out["labels"]


def build_exportable_detector(config: str | Path | DictConfig, checkpoint: str | Path) -> ExportableDetector:
    """A run's detector with its weights, BatchNorms folded, and the run's test resize inside, in eval mode."""
    cfg = load_run_config(config, DEFAULT_CONFIG)
    model = build_trained_model(build_detector, cfg.model, checkpoint)
    return ExportableDetector(fold_batchnorm(model.eval()), *test_resize_sides(cfg.data)).eval()


class NormalizedBackbone(nn.Module):
    """The detector's backbone body with its input normalisation: RGB [N, 3, H, W] in 0..1 -> {stage: features}
    (res2..res5 for fpn, res4 for c4 whose res5 runs per RoI, conv5 for vgg)."""

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        self.body = model.backbone.body
        self.preprocessing = model.transform.preprocessing

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.body(self.preprocessing.normalize(images))


def export_onnx(module: ExportableDetector, path: str | Path, opset: int = 17) -> None:
    """torchvision's Faster R-CNN pattern: the TorchScript-based exporter (`dynamo=False`), dynamic H and W.

    Not the torch.export-based default exporter: it cannot yet follow the data-dependent shapes of proposal
    filtering and NMS in torchvision's detection code."""
    example = torch.rand(3, 300, 400)  # any size: H and W are dynamic
    torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, input_names=["image"],
                      output_names=["boxes", "scores", "labels"],
                      dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                    "scores": {0: "detections"}, "labels": {0: "detections"}})


def export_torchscript(module: ExportableDetector, path: str | Path) -> None:
    """Traced (sizes are tensors while tracing, so other H, W work too) from the Predictor's own form, BN folded
    and channels_last (`detection.fast`): the file then runs the Predictor's convolution kernels, whose float32
    rounding differs from NCHW's just enough to flip a near-tie between two proposals now and then (one BCCD
    image in 87). onnxruntime has kernels of its own either way, so the ONNX export stays NCHW."""
    to_channels_last(module.model)
    with torch.no_grad():
        traced = torch.jit.trace(module, (torch.rand(3, 300, 400),), check_trace=False)
    traced.save(str(path))


def export_backbone(module: NormalizedBackbone, path: str | Path, stride: int = 32) -> torch.export.ExportedProgram:
    """torch.export with dynamic batch, H and W (multiples of `stride`, at least 2 strides, so every stage's size is exact)."""
    # at least 2 strides: a 1x1 last stage would be a broadcasting special case torch.export refuses to cover
    batch, height, width = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("h", min=2), torch.export.Dim("w", min=2)
    program = torch.export.export(module, (torch.rand(2, 3, 4 * stride, 3 * stride),),
                                  dynamic_shapes={"images": {0: batch, 2: stride * height, 3: stride * width}})
    torch.export.save(program, str(path))
    return program


def compare_detections(reference: tuple, other: tuple, score_thresh: float = 0.0) -> dict:
    """Two sets of (boxes, scores, labels) of one image, by the rule: every detection scoring >= CONFIDENT on
    either side has one of the same label scoring >= PRESENT within BOX_TOLERANCE_PX on the other. With a model
    score threshold above PRESENT, both bars rise to keep the same margin above it.
    Returns the confident counts, the unmatched ones of each side, the largest matched corner distance, `passed`."""
    present = max(PRESENT, score_thresh)
    confident = present + (CONFIDENT - PRESENT)
    sides = [tuple(np.asarray(t, dtype=np.float64) for t in side) for side in (reference, other)]
    result = {"confident": [], "unmatched": [], "max_box_diff_px": None}
    distances = []
    for (boxes, scores, labels), (other_boxes, other_scores, other_labels) in (sides, sides[::-1]):
        unmatched = []
        sure = np.flatnonzero(scores >= confident)
        for i in sure:
            candidates = (other_labels == labels[i]) & (other_scores >= present)
            distance = np.abs(other_boxes[candidates] - boxes[i]).max(axis=1).min(initial=np.inf)
            if distance <= BOX_TOLERANCE_PX:
                distances.append(float(distance))
            else:
                unmatched.append({"label": int(labels[i]), "score": round(float(scores[i]), 4),
                                  "box": [round(float(v), 1) for v in boxes[i]],
                                  "nearest_px": None if np.isinf(distance) else round(float(distance), 2)})
        result["confident"].append(len(sure))
        result["unmatched"].append(unmatched)
    result["max_box_diff_px"] = max(distances, default=None)
    result["passed"] = not any(result["unmatched"])
    return result
