"""Loading and saving backbone weights, with the preprocessing they expect travelling alongside.

A backbone checkpoint is `{"state_dict", "preprocessing", "stride_in_1x1", "name"}`; a raw
torchvision state dict (just tensors) also loads. Never unpickles: `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from .base import Backbone, Preprocessing

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]


def read_state_dict(weights: str | Path) -> dict:
    """A local checkpoint file, or a torchvision weights enum name (e.g. "ResNet50_Weights.IMAGENET1K_V1",
    which downloads if the network is reachable). Returns the checkpoint as a dict."""
    path = Path(weights)
    if path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path}: expected a state dict or a dict with 'state_dict', got {type(checkpoint).__name__}")
        return checkpoint
    if "_Weights." in str(weights):
        from torchvision.models import get_weight

        return get_weight(str(weights)).get_state_dict(progress=True)
    raise FileNotFoundError(f"backbone weights {str(weights)!r}: no such file (nor a torchvision weights name)")


def load_backbone_weights(backbone: Backbone, weights: str | Path, *, stride_in_1x1: bool | None = None) -> LoadReport:
    """Load `weights` into `backbone` (strict=False) and report what did not match.

    If the checkpoint records the preprocessing it was trained with, the backbone adopts it (and we
    warn when it differs from the backbone's default), so detectors normalise inputs the way the
    weights expect.
    """
    checkpoint = read_state_dict(weights)
    state_dict = checkpoint.get("state_dict", checkpoint)
    for prefix in ("module.", "backbone."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    result = backbone.load_state_dict(state_dict, strict=False)
    report = LoadReport(
        missing=[k for k in result.missing_keys if not k.endswith("num_batches_tracked")],
        unexpected=[k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")],
    )
    if report.missing:
        logger.warning("%s: %d backbone keys not in the checkpoint: %s", weights, len(report.missing), report.missing[:8])
    if report.unexpected:
        logger.warning("%s: %d checkpoint keys unused: %s", weights, len(report.unexpected), report.unexpected[:8])

    if "preprocessing" in checkpoint:
        stored = Preprocessing.from_dict(checkpoint["preprocessing"])
        if stored != backbone.preprocessing:
            warnings.warn(f"{weights}: trained with {stored}, backbone default is {backbone.preprocessing}; "
                          "using the checkpoint's preprocessing", stacklevel=2)
        backbone.preprocessing = stored
    if stride_in_1x1 is not None and "stride_in_1x1" in checkpoint and checkpoint["stride_in_1x1"] != stride_in_1x1:
        warnings.warn(f"{weights}: trained with stride_in_1x1={checkpoint['stride_in_1x1']} but the backbone "
                      f"is built with stride_in_1x1={stride_in_1x1}; features will be wrong", stacklevel=2)
    return report


def save_backbone(backbone: Backbone, path: str | Path, *, name: str, stride_in_1x1: bool = False,
                  include_classifier: bool = False) -> None:
    """Export a backbone checkpoint that `build_backbone(..., weights=path)` loads."""
    state_dict = backbone.state_dict()
    if not include_classifier:
        # drop the 1000-way layer only: VGG's fc6/fc7 (classifier.0/.3) are reused by its detection head
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "classifier.6."))}
    torch.save({"name": name, "state_dict": state_dict, "preprocessing": backbone.preprocessing.to_dict(),
                "stride_in_1x1": stride_in_1x1}, path)

