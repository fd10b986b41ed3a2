"""Loading and saving backbone weights, with the preprocessing they expect travelling alongside.

A backbone checkpoint is `{"state_dict", "preprocessing", "stride_in_1x1", "name"}`; a raw
torchvision state dict (just tensors) also loads, and so does the backbone part of a whole model: a ResDet
training checkpoint (`{"model": ...}` with `backbone.body.*` / `backbone.*` keys) or a torchvision /
Detectron2-style detector state dict. A file that does not fill the whole backbone, or that carries backbone
tensors it has no place for, is an error naming the architecture it looks like (unless a partial load is asked
for), never a silent partial start. Never unpickles: `torch.load(weights_only=True)`.
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


def load_backbone_weights(backbone: Backbone, weights: str | Path, *, stride_in_1x1: bool | None = None,
                          partial: bool = False) -> LoadReport:
    """Load `weights` into `backbone` and report what was loaded.

    The file must fill the whole backbone and carry no backbone tensor the backbone has no place for (another
    depth or width of the same family fills the stem and the norms by name and shape, and would train as a silent
    hybrid); only the classifier (`CLASSIFIER_PREFIXES`) and BN's `num_batches_tracked` may differ. `partial=True`
    (config `model.backbone.partial_weights`) loads what fits on purpose and logs exactly which tensors.
    If the checkpoint records the preprocessing it was trained with, the backbone adopts it (and we
    warn when it differs from the backbone's default), so detectors normalise inputs the way the
    weights expect.
    """
    checkpoint = read_state_dict(weights)
    tensors = _tensors(checkpoint, weights)
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    prefix = _backbone_prefix(tensors, own)
    state_dict = {k[len(prefix):]: v for k, v in tensors.items()
                  if k.startswith(prefix) and not k.endswith("num_batches_tracked")}
    fits = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    optional = [k for k in own if k.startswith(CLASSIFIER_PREFIXES) and k not in fits]  # a new classifier is fine
    missing = [k for k in own if k not in fits and k not in optional]
    extra = [k for k in state_dict if k not in fits and not k.startswith(CLASSIFIER_PREFIXES)]
    report = LoadReport(missing=missing, unexpected=extra, matched=len(own) - len(missing) - len(optional),
                        total=len(own) - len(optional), prefix=prefix)
    if (missing or extra) and (not partial or not fits):
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in extra if k in own][:2]
        raise ValueError(
            f"backbone weights {weights}: look like {describe_architecture(state_dict)}, not this "
            f"{describe_architecture(own)} backbone: {report.matched} of its {report.total} tensors filled, "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} in the file with no place in it "
            f"(e.g. {extra[:3]})" + (f", shape mismatches e.g. {shapes}" if shapes else "")
            + (f" (keys under {prefix!r})" if prefix else "")
            + ("; nothing fits at all" if not fits else "; set model.backbone.partial_weights=true to load the "
               "tensors that fit on purpose, or check model.backbone.name"))
    if prefix:
        logger.warning("%s: loading its backbone part (keys under %r): %d of %d backbone tensors", weights, prefix,
                       report.matched, report.total)
    backbone.load_state_dict(fits, strict=False)
    unused_classifier = [k for k in state_dict if k.startswith(CLASSIFIER_PREFIXES) and k not in fits]
    if unused_classifier:
        logger.info("%s: its classifier is not loaded (%s)", weights, ", ".join(unused_classifier))
    if missing or extra:
        logger.warning("%s: partial_weights: loaded %d of the backbone's %d tensors: %s; left as initialised "
                       "(%d): %s; unused from the file (%d): %s", weights, report.matched, report.total,
                       sorted(k for k in fits if k not in optional), len(missing), missing, len(extra), extra)

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


def describe_architecture(state_dict: dict[str, torch.Tensor]) -> str:
    """What a state dict's keys say it is: the ResNet-family names with its block kind and blocks per stage
    (`resnet50 / resnext50_32x4d / wide_resnet50_2 (bottleneck blocks 3-4-6-3)`), VGG-16, or a key count."""
    from .build import RESNETS  # a cycle at import time otherwise: build imports this module

    blocks = [1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{i}.")
                       and k.split(".")[1].isdigit()), default=-1) for i in (1, 2, 3, 4)]
    if all(blocks):
        kind = "bottleneck" if any(k.endswith("conv3.weight") for k in state_dict if k.startswith("layer")) else "basic"
        residual = any(".downsample." in k or ".shortcut." in k for k in state_dict)
        names = [name for name, (block, layers, variant) in RESNETS.items() if block == kind
                 and tuple(layers) == tuple(blocks) and variant.get("residual", True) == residual
                 and not variant.get("preact")]
        return f"{' / '.join(names) or 'a ResNet-style net'} ({kind} blocks {'-'.join(map(str, blocks))})"
    if any(k.startswith("features.") for k in state_dict):
        return "a VGG-style net (features.*)"
    return f"an unrecognised net ({len(state_dict)} tensors, e.g. {list(state_dict)[:2]})"


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

