"""The whole detector as one exportable module: float32 RGB [3, H, W] in 0..1 -> boxes, scores, labels, the
same detections as `detection.Predictor` (single-scale).

ResDet's detector leaves resizing to its datasets (`NormalizeOnlyTransform`); for export the run's test resize
moves into the graph as tensor arithmetic that gives the datasets' output size for every input size
(`resized_size`: albumentations' float64 rule, not torchvision's `GeneralizedRCNNTransform`, whose float32 scale
and floor give other sizes: 650x417 -> 96x61 instead of 96x62) and the same bilinear interpolation, rounded to
the uint8 grid the Predictor's OpenCV resize writes. The two resizes then differ by at most one grey level
(OpenCV interpolates in fixed point), which `compare_detections`' rule allows for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN

from backbones import fold_batchnorm
from engine.trained import load_model_state, load_run_config, model_config_for_inference

from .models import build_detector
from .predictor import DEFAULT_CONFIG, test_resize_sides

CONFIDENT = 0.3
"""`compare_detections`: every detection scoring at least this on one side must be found on the other..."""
PRESENT = 0.25
"""...as a detection of the same label scoring at least this (a grey level of resize may move a score a little),"""
BOX_TOLERANCE_PX = 1.0
"""...whose corners are within this many pixels."""


def resized_size(height: Tensor, width: Tensor, shortest: int, longest: int) -> tuple[Tensor, Tensor]:
    """The output size of the run's test resize (`detection.transforms.ResizeShortestEdge`) as int64 tensors, so
    that a traced graph computes it for any input size: scale = min(shortest / min(H, W), longest / max(H, W)),
    each side max(1, round(side * scale)) with round half to even, in float64, albumentations' arithmetic step for
    step (true divisions of the integers, not `reciprocal() * x`, which rounds differently)."""
    height, width = height.double(), width.double()
    scale = torch.minimum(torch.full_like(height, shortest) / torch.minimum(height, width),
                          torch.full_like(height, longest) / torch.maximum(height, width))
    return (height * scale).round().clamp_min(1).long(), (width * scale).round().clamp_min(1).long()


class InGraphTestResize(nn.Module):
    """float RGB [3, H, W] in 0..1 -> the run's test resize of it: `resized_size`, bilinear with half-pixel
    centres and no antialiasing (OpenCV's INTER_LINEAR), values rounded to multiples of 1/255 as the Predictor's
    uint8 resize gives them."""

    def __init__(self, shortest: int, longest: int) -> None:
        super().__init__()
        self.shortest, self.longest = shortest, longest

    def forward(self, image: Tensor) -> Tensor:
        shape = torch._shape_as_tensor(image)  # tensors while tracing, so the exported graph keeps H, W dynamic
        height, width = resized_size(shape[-2], shape[-1], self.shortest, self.longest)
        if not torch.jit.is_tracing():
            height, width = int(height), int(width)
        resized = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return torch.round(resized * 255) / 255


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
        ratio_y, ratio_x = (original / new).float().unbind()  # float64 quotients cast to float32, as the Predictor's
        return out["boxes"] * torch.stack([ratio_x, ratio_y, ratio_x, ratio_y]), out["scores"], out["labels"]


def build_exportable_detector(config: str | Path | DictConfig, checkpoint: str | Path) -> ExportableDetector:
    """A run's detector with its weights, BatchNorms folded, and the run's test resize inside, in eval mode."""
    cfg = load_run_config(config, DEFAULT_CONFIG)
    model = build_detector(model_config_for_inference(cfg.model))
    model.load_state_dict(load_model_state(checkpoint))
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
    """Traced (sizes are tensors while tracing, so other H, W work too)."""
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
