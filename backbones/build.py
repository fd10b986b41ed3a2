"""`build_backbone`: the one way every tool and config turns a name into a Backbone."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .base import Backbone
from .batch_norm import NORMS, convert_eval_batchnorm, convert_frozen_batchnorm, get_norm
from .cifar_resnet import CIFAR_NETS, CifarResNet
from .resnet import ResNet
from .timm_backbone import TimmBackbone
from .vgg import VGG16
from .weights import load_backbone_weights

DEFAULT_OUT_FEATURES = ("res2", "res3", "res4", "res5")

# name -> (block, layers per stage, ResNet keyword arguments)
RESNETS: dict[str, tuple[str, tuple[int, int, int, int], dict[str, Any]]] = {
    "resnet18": ("basic", (2, 2, 2, 2), {}),
    "resnet34": ("basic", (3, 4, 6, 3), {}),
    "resnet50": ("bottleneck", (3, 4, 6, 3), {}),
    "resnet101": ("bottleneck", (3, 4, 23, 3), {}),
    "resnet152": ("bottleneck", (3, 8, 36, 3), {}),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), {"groups": 32, "width_per_group": 8}),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), {"width_per_group": 128}),
    "preact_resnet18": ("basic", (2, 2, 2, 2), {"preact": True}),
    "preact_resnet50": ("bottleneck", (3, 4, 6, 3), {"preact": True}),
}
# the paper's plain nets: the same layers as their ResNet twins, without shortcuts
for _depth in (18, 34, 50, 101, 152):
    _block, _layers, _ = RESNETS[f"resnet{_depth}"]
    RESNETS[f"plain{_depth}"] = (_block, _layers, {"residual": False})
VGGS = ("vgg16", "vgg16_bn")
# every backbone also takes norm_eval
RESNET_OPTIONS = {"shortcut", "stride_in_1x1", "output_stride", "replace_stride_with_dilation", "zero_init_residual",
                  "num_classes"}
VGG_OPTIONS = {"num_classes"}
CIFAR_OPTIONS = {"shortcut", "zero_init_residual", "num_classes"}
TIMM_OPTIONS = {"output_stride"}


def backbone_names() -> list[str]:
    return [*RESNETS, *CIFAR_NETS, *VGGS, "timm:<model>"]


def _check_options(name: str, options: dict[str, Any], valid: set[str]) -> None:
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for backbone {name!r}; valid options are {sorted(valid)}")


def _output_stride(options: dict[str, Any]) -> int:
    """`replace_stride_with_dilation` (torchvision's spelling) or `output_stride` -> output stride."""
    dilation = options.pop("replace_stride_with_dilation", None)
    if dilation is None:
        return options.pop("output_stride", 32)
    flags = tuple(bool(f) for f in dilation)
    by_flags = {(False, False, False): 32, (False, False, True): 16, (False, True, True): 8}
    if flags not in by_flags:
        raise ValueError(f"replace_stride_with_dilation={list(dilation)} must be one of {[list(f) for f in by_flags]}")
    return by_flags[flags]


def build_backbone(name: str, *, out_features: Sequence[str] = DEFAULT_OUT_FEATURES, freeze_at: int = 0,
                   norm: str = "BN", weights: str | Path | None = None, partial_weights: bool = False,
                   **options: Any) -> Backbone:
    """Build a backbone by name, load `weights` (the whole backbone, or what fits with `partial_weights`), then
    freeze the first `freeze_at` stages.

    Names: resnet18/34/50/101/152, plain18/34/50/101/152, resnext50_32x4d, resnext101_32x8d,
    wide_resnet50_2, preact_resnet18/50, the CIFAR nets resnet20/32/44/56/110/1202 and plain20..110
    (stages stem, res2..res4; options shortcut (default "A"), zero_init_residual, num_classes),
    vgg16 (no norm layers, the paper's baseline), vgg16_bn, and `timm:<any timm model>`. `freeze_at`: 0 nothing, 1 stem, 2 stem + res2, ... (Detectron2).
    For VGG the default `out_features` means `("conv5",)`: conv5_3 at stride 16.

    Options (ResNets): shortcut "A" | "B" | "C", stride_in_1x1, output_stride 32 | 16 | 8 (or
    torchvision's replace_stride_with_dilation), zero_init_residual, num_classes (adds avgpool + fc,
    output "logits"), norm_eval (BN statistics stay fixed in train mode).
    """
    if not isinstance(name, str):
        raise ValueError(f"backbone name {name!r} is not a name; valid names are {backbone_names()}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid choices are {list(NORMS)}")
    options = dict(options)
    norm_eval = options.pop("norm_eval", False)
    stride_in_1x1 = None
    if name in RESNETS:
        _check_options(name, options, RESNET_OPTIONS)
        block, layers, variant = RESNETS[name]
        stride_in_1x1 = bool(options.get("stride_in_1x1", False))
        output_stride = _output_stride(options)
        backbone: Backbone = ResNet(block, layers, norm=get_norm(norm), output_stride=output_stride, **variant, **options)
    elif name in CIFAR_NETS:
        _check_options(name, options, CIFAR_OPTIONS)
        blocks_per_stage, residual = CIFAR_NETS[name]
        backbone = CifarResNet(blocks_per_stage, norm=get_norm(norm), residual=residual, **options)
        if tuple(out_features) == DEFAULT_OUT_FEATURES:
            out_features = ("res2", "res3", "res4")
    elif name in VGGS:
        _check_options(name, options, VGG_OPTIONS)
        backbone = VGG16(norm=get_norm(norm) if name == "vgg16_bn" else None, **options)
        if tuple(out_features) == DEFAULT_OUT_FEATURES:
            out_features = ("conv5",)
    elif name.startswith("timm:"):
        _check_options(name, options, TIMM_OPTIONS)
        backbone = TimmBackbone(name.removeprefix("timm:"), weights=str(weights) if weights else None,
                                output_stride=_output_stride(options))
        if norm not in ("BN", "FrozenBN"):
            raise ValueError(f"timm backbones keep their own norm layers: norm must be 'BN' or 'FrozenBN', got {norm!r}")
        if norm == "FrozenBN":
            convert_frozen_batchnorm(backbone)
        weights = None  # timm loaded them with its own key remapping
    else:
        raise ValueError(f"unknown backbone {name!r}; valid names are {backbone_names()}")

    if weights:
        load_backbone_weights(backbone, weights, stride_in_1x1=stride_in_1x1, partial=partial_weights)
    backbone.set_out_features(out_features)
    backbone.freeze(freeze_at)
    if norm_eval:
        convert_eval_batchnorm(backbone)
    return backbone
