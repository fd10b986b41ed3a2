"""The whole detector as one exportable module: float32 RGB [3, H, W] in 0..1 -> boxes, scores, labels.

ResDet's detector leaves resizing to its datasets (`NormalizeOnlyTransform`); for export the resize moves
back into the model, through torchvision's own `GeneralizedRCNNTransform` (whose traced resize and box
rescaling are what torchvision's Faster R-CNN ONNX export relies on), with our normalisation.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from backbones import Preprocessing, fold_batchnorm
from engine.trained import load_model_state, load_run_config, model_config_for_inference

from .models import build_detector
from .predictor import DEFAULT_CONFIG


class ResizeNormalizeTransform(GeneralizedRCNNTransform):
    """torchvision's batching transform with its resize (shortest side `min_size`, longest capped at
    `max_size`, bilinear) and the normalisation the weights expect."""

    def __init__(self, preprocessing: Preprocessing, min_size: int, max_size: int, size_divisible: int) -> None:
        super().__init__(min_size=min_size, max_size=max_size, image_mean=list(preprocessing.pixel_mean),
                         image_std=list(preprocessing.pixel_std), size_divisible=size_divisible)
        self.preprocessing = preprocessing

    def normalize(self, image: Tensor) -> Tensor:
        return self.preprocessing.normalize(image[None])[0]


class ExportableDetector(nn.Module):
    """One image in, (boxes [N, 4] x0 y0 x1 y1 in the input's pixels, scores [N], labels [N] 1..K) out."""

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def build_exportable_detector(config: str | Path | DictConfig, checkpoint: str | Path) -> ExportableDetector:
    """A run's detector with its weights, BatchNorms folded, and the test resize inside, in eval mode.

    The resize is torchvision's (torch bilinear on floats) rather than the datasets' albumentations/OpenCV
    resize on uint8, so exported detections can differ from `Predictor`'s by that interpolation."""
    cfg = load_run_config(config, DEFAULT_CONFIG)
    model = build_detector(model_config_for_inference(cfg.model))
    model.load_state_dict(load_model_state(checkpoint))
    sizes = [cfg.data.min_size] if isinstance(cfg.data.min_size, int) else list(cfg.data.min_size)
    old = model.transform
    model.transform = ResizeNormalizeTransform(old.preprocessing, max(sizes), cfg.data.max_size, old.size_divisible)
    return ExportableDetector(fold_batchnorm(model.eval())).eval()


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
    """Traced (torchvision's detection code keeps sizes as tensors while tracing, so other H, W work too)."""
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


def compare_detections(reference: tuple[Tensor, ...], other: tuple, box_tol: float = 1.0) -> dict:
    """Exported vs PyTorch detections of one image: same number, same labels in the same order, boxes within
    `box_tol` pixels. Returns the differences and `passed`."""
    ref_boxes, ref_scores, ref_labels = (torch.as_tensor(t) for t in reference)
    boxes, scores, labels = (torch.as_tensor(t) for t in other)
    same_count = len(ref_boxes) == len(boxes)
    result = {"detections": len(ref_boxes), "exported_detections": len(boxes), "labels_equal": False,
              "max_box_diff_px": None, "max_score_diff": None}
    if same_count:
        result["labels_equal"] = bool(torch.equal(ref_labels.long(), labels.long()))
        if len(boxes):
            result["max_box_diff_px"] = float((ref_boxes.double() - boxes.double()).abs().max())
            result["max_score_diff"] = float((ref_scores.double() - scores.double()).abs().max())
    result["passed"] = same_count and result["labels_equal"] and (result["max_box_diff_px"] or 0.0) <= box_tol
    return result
