"""Normalisation layers by name, and frozen BatchNorm for fine-tuning with small batches."""
from __future__ import annotations

from typing import Callable

from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d  # eps explicit, stats + affine as buffers, drops num_batches_tracked

NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "none")

__all__ = ["FrozenBatchNorm2d", "NORMS", "convert_frozen_batchnorm", "get_norm"]


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
