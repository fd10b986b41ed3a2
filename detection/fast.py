"""The fastest exact inference form of a trained detector; docs/benchmarks.md measures each step.

- BatchNorm folded into the convolution before it (a trained model's BN is an affine map at test time);
- weights and the batch entering the backbone in channels_last (NHWC), which oneDNN / cuDNN run faster;
- optionally backbone + FPN compiled (`torch.compile`, inductor with frozen weights). The RPN, RoIAlign and
  NMS stay eager: their data-dependent shapes break graphs, and they are not dense arithmetic.

The detections equal the unchanged model's up to float32 rounding (exactly, in float64: the benchmark checks).
"""
from __future__ import annotations

import torch
from torchvision.models.detection import FasterRCNN

from backbones import fold_batchnorm


def to_channels_last(model: FasterRCNN) -> FasterRCNN:
    """Conv weights in NHWC, and the batch entering the backbone too: the batching transform copies the
    images into a fresh NCHW tensor, so a pre-hook converts it where the network starts."""
    model.to(memory_format=torch.channels_last)
    model.backbone.register_forward_pre_hook(lambda module, args: (args[0].contiguous(memory_format=torch.channels_last),))
    return model


def optimize_for_inference(model: FasterRCNN, *, compile: bool = False) -> FasterRCNN:
    """`model` in eval mode, BN folded, channels_last and, with `compile`, backbone + FPN compiled (the first
    call at each new input size compiles: tens of seconds on a CPU, so it pays off on long runs only)."""
    to_channels_last(fold_batchnorm(model.eval()))
    if compile:
        # freezing: weights become constants, so inductor can pre-pack them for oneDNN (inference only)
        model.backbone = torch.compile(model.backbone, options={"freezing": True})
    return model
