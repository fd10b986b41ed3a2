"""Loading and saving backbone weights, with the preprocessing they expect travelling alongside.

A backbone checkpoint is `{"state_dict", "preprocessing", "stride_in_1x1", "name"}`; a raw
torchvision state dict (just tensors) also loads, and so does the backbone part of a whole model: a ResDet
training checkpoint (`{"model": ...}` with `backbone.body.*` / `backbone.*` keys) or a torchvision /
Detectron2-style detector state dict. Fewer than half the backbone's keys matching is an error, never a
silent random start. Never unpickles: `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import logging
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from .base import Backbone, Preprocessing

logger = logging.getLogger(__name__)


MIN_MATCHED = 0.5
"""Fraction of the backbone's keys a checkpoint must fill; below it the weights are refused."""
CLASSIFIER_PREFIXES = ("fc.", "classifier.6.")
"""Keys of the 1000-way layer, which backbone exports drop: not counted as missing."""


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]
    matched: int = 0
    total: int = 0
    prefix: str = ""


def read_state_dict(weights: str | Path) -> dict:
    """A local checkpoint file, or a torchvision weights enum name (e.g. "ResNet50_Weights.IMAGENET1K_V1",
    which downloads if the network is reachable). Returns the checkpoint as a dict."""
    path = Path(weights)
    if path.is_file():
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's own message suggests weights_only=False, which would run arbitrary code from the file
            kind = "holds Python objects besides tensors" if "Unsupported global" in str(err) else "is not a checkpoint"
            raise ValueError(f"backbone weights {path}: the file {kind} (torch.load with weights_only=True refuses "
                             f"it); give a torchvision state dict or tools/train_cls.py's backbone.pth, or re-save "
                             f"the checkpoint's state_dict() with torch.save") from None
        except Exception as err:  # noqa: BLE001 - the unpickler fails on arbitrary bytes with any of a dozen types
            raise ValueError(f"backbone weights {path}: not a PyTorch checkpoint ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:120] if str(err) else 'empty or truncated file'}); give a "
                             "torchvision state dict or tools/train_cls.py's backbone.pth") from None
        if not isinstance(checkpoint, dict):
            raise ValueError(f"backbone weights {path}: expected a state dict or a dict with 'state_dict', got "
                             f"{type(checkpoint).__name__}")
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
    tensors = _tensors(checkpoint, weights)
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    prefix = _backbone_prefix(tensors, own)
    state_dict = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    fits = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    wanted = [k for k in own if not (k.startswith(CLASSIFIER_PREFIXES) and k not in state_dict)]
    matched = sum(k in fits for k in wanted)
    if matched < MIN_MATCHED * len(wanted):
        theirs = [k for k in tensors if k.removeprefix(prefix) not in fits][:4]
        ours = [k for k in wanted if k not in fits][:4]
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state_dict and k not in fits][:2]
        raise ValueError(f"backbone weights {weights}: only {matched} of the backbone's {len(wanted)} keys match "
                         f"(best key prefix {prefix!r}); checkpoint keys e.g. {theirs}, backbone keys e.g. {ours}"
                         + (f", shape mismatches e.g. {shapes}" if shapes else "")
                         + "; is it the weights of another architecture (model.backbone.name)?")
    if prefix:
        logger.warning("%s: loading its backbone part (keys under %r): %d of %d backbone keys", weights, prefix,
                       matched, len(wanted))
    result = backbone.load_state_dict(fits, strict=False)
    report = LoadReport(
        missing=[k for k in result.missing_keys if not k.endswith("num_batches_tracked")],
        unexpected=[k for k in state_dict if k not in fits and not k.endswith("num_batches_tracked")],
        matched=matched, total=len(wanted), prefix=prefix,
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


def _tensors(checkpoint: dict, weights: str | Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: itself, or under "state_dict" (backbone.pth) / "model" (ResDet training
    checkpoints, Detectron2)."""
    for candidate in (checkpoint.get("state_dict"), checkpoint.get("model"), checkpoint):
        if isinstance(candidate, dict):
            tensors = {k: v for k, v in candidate.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
    raise ValueError(f"backbone weights {weights}: holds no tensors (top-level keys {list(checkpoint)[:6]}); give a "
                     "torchvision state dict or tools/train_cls.py's backbone.pth")


def _backbone_prefix(tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str:
    """The key prefix under which the checkpoint holds this backbone ('' for a backbone state dict,
    'backbone.body.' for a detector, 'module.backbone.' for a DDP segmentation model...): the prefix
    whose removal maps the most checkpoint keys onto backbone keys of the same shape."""
    votes: Counter[str] = Counter()
    for key, value in tensors.items():
        for cut in [0] + [i + 1 for i, char in enumerate(key) if char == "."]:
            rest = key[cut:]
            if rest in own and own[rest].shape == value.shape:
                votes[key[:cut]] += 1
    return votes.most_common(1)[0][0] if votes else ""


def save_backbone(backbone: Backbone, path: str | Path, *, name: str, stride_in_1x1: bool = False,
                  include_classifier: bool = False) -> None:
    """Export a backbone checkpoint that `build_backbone(..., weights=path)` loads."""
    state_dict = backbone.state_dict()
    if not include_classifier:
        # drop the 1000-way layer only: VGG's fc6/fc7 (classifier.0/.3) are reused by its detection head
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("fc.", "classifier.6."))}
    torch.save({"name": name, "state_dict": state_dict, "preprocessing": backbone.preprocessing.to_dict(),
                "stride_in_1x1": stride_in_1x1}, path)

