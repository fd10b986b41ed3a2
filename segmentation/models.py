"""Semantic segmentation: DeepLabV3, DeepLabV3+ and the Panoptic-FPN semantic head on any Backbone.

Every head takes the backbone's feature dict and reads its channels from `output_shape()` (512 for a
ResNet-18 res5, 2048 for a ResNet-50) rather than hard-coding them.
Attribute names (`backbone`, `classifier`, `aux_classifier`) match torchvision's DeepLabV3, so a
torchvision `deeplabv3_resnet50` state dict loads into ours as is.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from itertools import zip_longest
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import FeaturePyramidNetwork

from backbones import Backbone, ShapeSpec, build_backbone

# DeepLab's ASPP rates scale with the dilation of res5 (Chen et al. 2017, §4.1)
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
# backbone outputs each head reads; any head may add the FCN auxiliary head on AUX_FEATURE
HEAD_FEATURES = {
    "deeplabv3": ("res5",),
    "deeplabv3plus": ("res2", "res5"),
    "fpn": ("res2", "res3", "res4", "res5"),
}
AUX_FEATURE = "res4"


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False), norm, nn.ReLU()
    )


class DeepLabV3Head(DeepLabHead):
    """torchvision's DeepLabHead (ASPP + 3x3 conv-BN-ReLU + 1x1 classifier) on `res5`.

    A subclass rather than a wrapper, so the state-dict keys stay torchvision's (`classifier.0.convs...`).
    """

    def __init__(self, input_shape: Mapping[str, ShapeSpec], num_classes: int, atrous_rates: tuple[int, ...]) -> None:
        super().__init__(input_shape["res5"].channels, num_classes, atrous_rates)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return super().forward(features["res5"])


class FCNAuxHead(FCNHead):
    """torchvision's FCN auxiliary head on `res4`; adds deep supervision during training."""

    def __init__(self, input_shape: Mapping[str, ShapeSpec], num_classes: int) -> None:
        super().__init__(input_shape[AUX_FEATURE].channels, num_classes)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        return super().forward(features[AUX_FEATURE])


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): the DeepLabV3 ASPP encoder plus a light decoder on `res2`.

    torchvision has the ASPP but no decoder, so the decoder is hand-written: low-level features
    are squeezed to 48 channels so they do not outweigh the 256-channel ASPP output, then both are
    refined at stride 4, which recovers object boundaries lost at stride 16/8.
    """

    def __init__(self, input_shape: Mapping[str, ShapeSpec], num_classes: int, atrous_rates: tuple[int, ...],
                 channels: int = 256, low_level_channels: int = 48) -> None:
        super().__init__()
        self.aspp = ASPP(input_shape["res5"].channels, atrous_rates, channels)
        self.low_level = conv_norm_relu(input_shape["res2"].channels, low_level_channels, 1,
                                        nn.BatchNorm2d(low_level_channels))
        self.fuse = nn.Sequential(
            conv_norm_relu(channels + low_level_channels, channels, 3, nn.BatchNorm2d(channels)),
            conv_norm_relu(channels, channels, 3, nn.BatchNorm2d(channels)),
        )
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        low_level = self.low_level(features["res2"])
        context = F.interpolate(self.aspp(features["res5"]), size=low_level.shape[-2:], mode="bilinear",
                                align_corners=False)
        return self.predictor(self.fuse(torch.cat([context, low_level], dim=1)))


class ScaleBranch(nn.Module):
    """Brings one FPN level to stride 4: k x [3x3 conv-GN-ReLU, 2x bilinear upsample]; P2 gets one conv only."""

    def __init__(self, in_channels: int, channels: int, num_upsamples: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            conv_norm_relu(in_channels if i == 0 else channels, channels, 3, nn.GroupNorm(32, channels))
            for i in range(max(num_upsamples, 1))
        )

    def forward(self, x: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
        """`sizes`: the finer levels' sizes, coarse to fine. Upsampling to them rather than by exactly 2x
        keeps the branches summable when the input is not a multiple of 32."""
        for conv, size in zip_longest(self.convs, sizes):
            x = conv(x)
            if size is not None:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


class FPNSemanticHead(nn.Module):
    """Panoptic FPN's semantic branch (Kirillov et al. 2019) on torchvision's FeaturePyramidNetwork.

    torchvision has the pyramid but not the branch that merges it, so that part is hand-written:
    every level P2..P5 is brought to stride 4, the four maps are summed, and a 1x1 conv classifies.
    """

    def __init__(self, input_shape: Mapping[str, ShapeSpec], num_classes: int, fpn_channels: int = 256,
                 channels: int = 128) -> None:
        super().__init__()
        self.in_features = HEAD_FEATURES["fpn"]
        self.fpn = FeaturePyramidNetwork([input_shape[name].channels for name in self.in_features], fpn_channels)
        # levels double in stride (res2..res5 at output stride 32), so level k needs k upsamplings
        self.branches = nn.ModuleList(ScaleBranch(fpn_channels, channels, k) for k in range(len(self.in_features)))
        self.predictor = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        pyramid = list(self.fpn(OrderedDict((name, features[name]) for name in self.in_features)).values())
        sizes = [tuple(level.shape[-2:]) for level in pyramid]
        merged = sum(branch(level, sizes[:k][::-1]) for k, (branch, level) in enumerate(zip(self.branches, pyramid)))
        return self.predictor(merged)


class SegmentationModel(nn.Module):
    """Backbone + segmentation head (+ optional FCN auxiliary head): RGB [0,1] images in, logits at input size out.

    The head is stored as `classifier`, torchvision's name, so torchvision DeepLabV3 state dicts load directly.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, aux_classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = head
        self.aux_classifier = aux_classifier

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.backbone(self.backbone.preprocessing.normalize(images))
        size = images.shape[-2:]
        outputs = {"out": F.interpolate(self.classifier(features), size=size, mode="bilinear", align_corners=False)}
        if self.aux_classifier is not None:
            aux = self.aux_classifier(features)
            outputs["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return outputs


def build_segmentation_model(cfg_model: Mapping[str, Any]) -> SegmentationModel:
    """Build a model from the `model` config (DictConfig or dict): head, num_classes, output_stride,
    aux_loss, backbone {name, freeze_at, norm, weights, options}. FPN always runs at output stride 32."""
    cfg = OmegaConf.to_container(OmegaConf.create(dict(cfg_model)), resolve=True)
    head_name = cfg["head"]
    if head_name not in HEAD_FEATURES:
        raise ValueError(f"unknown segmentation head {head_name!r}; valid heads are {list(HEAD_FEATURES)}")
    num_classes, aux_loss = cfg["num_classes"], cfg.get("aux_loss", False)
    output_stride = 32 if head_name == "fpn" else cfg.get("output_stride", 16)
    if head_name != "fpn" and output_stride not in ATROUS_RATES:
        raise ValueError(f"output_stride={output_stride!r} for {head_name}: must be one of {list(ATROUS_RATES)}")

    backbone_cfg = cfg["backbone"]
    options = backbone_cfg.get("options") or {}
    if "output_stride" in options:
        raise ValueError("set model.output_stride, not model.backbone.options.output_stride")
    out_features = tuple(dict.fromkeys(HEAD_FEATURES[head_name] + ((AUX_FEATURE,) if aux_loss else ())))
    backbone = build_backbone(backbone_cfg["name"], out_features=out_features, freeze_at=backbone_cfg.get("freeze_at", 0),
                              norm=backbone_cfg.get("norm", "BN"), weights=backbone_cfg.get("weights"),
                              partial_weights=backbone_cfg.get("partial_weights", False),
                              output_stride=output_stride, **options)

    shape = backbone.output_shape()
    if head_name == "deeplabv3":
        head: nn.Module = DeepLabV3Head(shape, num_classes, ATROUS_RATES[output_stride])
    elif head_name == "deeplabv3plus":
        head = DeepLabV3PlusHead(shape, num_classes, ATROUS_RATES[output_stride])
    else:
        head = FPNSemanticHead(shape, num_classes)
    return SegmentationModel(backbone, head, FCNAuxHead(shape, num_classes) if aux_loss else None)


def segmentation_loss(outputs: Mapping[str, Tensor], targets: Tensor, ignore_index: int = 255,
                      aux_weight: float = 0.5) -> dict[str, Tensor]:
    """Per-pixel cross-entropy over labelled pixels. `loss_aux` (only with an aux head) is already
    scaled by `aux_weight`, so the training loss is simply the sum of the values."""
    losses = {"loss_seg": _cross_entropy(outputs["out"], targets, ignore_index)}
    if "aux" in outputs:
        losses["loss_aux"] = aux_weight * _cross_entropy(outputs["aux"], targets, ignore_index)
    return losses


def _cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Mean over non-void pixels; an all-void crop gives 0 rather than PyTorch's NaN."""
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)
