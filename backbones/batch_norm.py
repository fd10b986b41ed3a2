"""Normalisation layers by name, and frozen BatchNorm for fine-tuning with small batches."""
from __future__ import annotations

from typing import Callable

import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d  # eps explicit, stats + affine as buffers, drops num_batches_tracked

NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "none")

__all__ = ["ConvNorm", "EvalBatchNorm2d", "FrozenBatchNorm2d", "NORMS", "conv_norm", "convert_eval_batchnorm",
           "convert_frozen_batchnorm", "fold_batchnorm", "get_norm"]


def get_norm(norm: str | None) -> Callable[[int], nn.Module]:
    """A factory `channels -> norm layer` for a norm name in NORMS."""
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "SyncBN":
        return nn.SyncBatchNorm
    if norm == "FrozenBN":
        return FrozenBatchNorm2d
    if norm == "GN":
        return lambda channels: nn.GroupNorm(32, channels)
    if norm in (None, "none"):
        return lambda channels: nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; valid choices are {list(NORMS)}")


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d / SyncBatchNorm in `module` (or `module` itself) for a frozen copy.

    timm's converter copies weight, bias, running stats and eps, and also handles its fused
    BatchNormAct2d; returns the converted module (a new object only if `module` was itself a BN).
    """
    return freeze_batch_norm_2d(module)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(conv(x))`. A frozen BN is a fixed per-channel affine map, so it is applied inside the convolution
    instead: weight * scale and bias = shift. That saves two passes over the output forward and one backward
    (about 8 % of a CPU training step of R50-FPN, docs/benchmarks.md); the conv weight still trains, with the
    gradient the chain rule gives through the scaling. Equal to `norm(conv(x))` up to float rounding."""
    if isinstance(norm, FrozenBatchNorm2d) and conv.bias is None:
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # FrozenBatchNorm2d.forward's arithmetic
        shift = norm.bias - norm.running_mean * scale
        return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), shift)
    return norm(conv(x))


class ConvNorm(nn.Sequential):
    """`Sequential(conv, norm)` (a projection shortcut; state-dict keys `0.*`, `1.*` as torchvision's) that
    applies a frozen BN inside the convolution, like `conv_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_norm(self[0], self[1], x)


class EvalBatchNorm2d(nn.BatchNorm2d):
    """`norm_eval`: a BatchNorm2d that always normalises with its running statistics (they never update), while
    its scale and shift still train. It stays in eval mode whatever `train()` says, so the rule travels with the
    layer wherever its module moves (C4's res5 into the box head), and SyncBN conversion leaves it alone."""

    def train(self, mode: bool = True) -> "EvalBatchNorm2d":
        return super().train(False)


def convert_eval_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d / SyncBatchNorm in `module` (or `module` itself) for an `EvalBatchNorm2d` copy."""
    if type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        converted = EvalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats).to(module.weight.device if module.affine else "cpu")
        converted.load_state_dict(module.state_dict())
        if module.affine:
            converted.requires_grad_(module.weight.requires_grad)
        return converted.eval()
    for name, child in module.named_children():
        module.add_module(name, convert_eval_batchnorm(child))
    return module


@torch.no_grad()
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold each eval-mode/frozen BatchNorm that directly follows a conv into that conv (in place).

    The paper notes BN "can be merged" at inference: conv+BN becomes one conv with a bias. Pairs are
    found by name the way ResNet/VGG lay them out (`convK` -> `bnK` siblings, and `Sequential(conv, bn)`
    as in `downsample` / vgg16_bn's features). Uses torch's `fuse_conv_bn_weights`. Pre-activation blocks
    (BN-ReLU before the conv, `norm_before_conv`) cannot be folded this way: refused before anything changes.
    """
    preact = [name for name, m in module.named_modules() if getattr(m, "norm_before_conv", False)]
    if preact:
        raise ValueError(f"fold_batchnorm: {len(preact)} pre-activation block(s) (e.g. {preact[0]!r}) apply BN-ReLU "
                         "before their convs, so BN cannot be folded into a conv; run them unfolded")
    for parent in module.modules():
        pairs = []
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            pairs = [(a, b) for (a, _), (b, _) in zip(children, children[1:])]
        else:
            pairs = [(f"conv{i}", f"bn{i}") for i in range(1, 4)]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, (FrozenBatchNorm2d, nn.BatchNorm2d)) and not bn.training:
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                    bn.weight, bn.bias)
                conv.weight, conv.bias = weight, bias
                setattr(parent, bn_name, nn.Identity())
    return module
