"""ResNet (He et al. 2015), its plain twins, ResNeXt / wide variants and pre-activation ResNet.

Module and attribute names follow torchvision (`conv1`, `bn1`, `layer1..4`, `downsample`, `fc`) so a
torchvision state dict loads as is. Stages are named the Detectron2 way: `stem` (stride 4, after
the max-pool), `res2`..`res5`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Backbone, ShapeSpec, check_input
from .batch_norm import ConvNorm, conv_norm

NormFactory = Callable[[int], nn.Module]
SHORTCUTS = ("A", "B", "C")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, groups=groups, dilation=dilation, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Paper option A: identity shortcut that subsamples and zero-pads the extra channels (no parameters)."""

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int, norm: NormFactory) -> nn.Module | None:
    """The shortcut of one block for option A / B / C; None means identity."""
    shape_changes = stride != 1 or in_channels != out_channels
    if kind == "A":
        return ZeroPadShortcut(out_channels, stride) if shape_changes else None
    if kind == "B" and not shape_changes:
        return None
    return ConvNorm(conv1x1(in_channels, out_channels, stride), norm(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). `residual=False` drops the shortcut: the paper's plain net."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, norm: NormFactory = nn.BatchNorm2d, dilation: int = 1, **_: object) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride, dilation=dilation)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = norm(planes)
        self.downsample = downsample
        self.residual = residual

    def zero_init_last(self) -> None:
        """Zero the last BN's scale: the residual branch starts at 0 and the block at identity."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (ResNet-50/101/152, ResNeXt, wide). Stride on the 3x3 (torchvision) or
    on the first 1x1 (`stride_in_1x1`, the paper / original Caffe models)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, norm: NormFactory = nn.BatchNorm2d, dilation: int = 1, groups: int = 1,
                 base_width: int = 64, stride_in_1x1: bool = False) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_channels, width, stride_1x1)
        self.bn1 = norm(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups, dilation)
        self.bn2 = norm(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv ordering (He et al. 2016, "Identity Mappings"): the shortcut path stays clean.
    `norm_before_conv` tells fold_batchnorm that its BNs cannot be folded into the following conv."""

    expansion = 1
    norm_before_conv = True

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, norm: NormFactory = nn.BatchNorm2d, dilation: int = 1, **_: object) -> None:
        super().__init__()
        self.bn1 = norm(in_channels)
        self.conv1 = conv3x3(in_channels, planes, stride, dilation=dilation)
        self.bn2 = norm(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def zero_init_last(self) -> None:
        """No BN ends the residual branch here, so zero its last conv (as timm does for pre-activation blocks)."""
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(pre))
        return out


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (BN-ReLU before each of the three convs)."""

    expansion = 4
    norm_before_conv = True

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
                 residual: bool = True, norm: NormFactory = nn.BatchNorm2d, dilation: int = 1, groups: int = 1,
                 base_width: int = 64, stride_in_1x1: bool = False) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = norm(in_channels)
        self.conv1 = conv1x1(in_channels, width, stride_1x1)
        self.bn2 = norm(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups, dilation)
        self.bn3 = norm(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(pre))
        return out


def _check_combination(block: str, norm: NormFactory, *, residual: bool, shortcut: str | None, stride_in_1x1: bool,
                       groups: int, width_per_group: int, zero_init_residual: bool, num_classes: int | None) -> None:
    """Refuse options that would be silently ignored or break the net, with the reason."""
    if not residual and zero_init_residual:
        raise ValueError("zero_init_residual on a plain net (no shortcuts) would zero every block's output and "
                         "gradient; use it only with residual nets")
    if not residual and shortcut is not None:
        raise ValueError(f"shortcut={shortcut!r} on a plain net: plain nets have no shortcuts")
    if block == "basic" and (groups != 1 or width_per_group != 64):
        raise ValueError(f"groups={groups} / width_per_group={width_per_group} need bottleneck blocks (ResNeXt / wide "
                         "ResNet); basic-block nets (ResNet-18/34) have no grouped 3x3 conv")
    if block == "basic" and stride_in_1x1:
        raise ValueError("stride_in_1x1 applies to bottleneck blocks (ResNet-50 and deeper); basic blocks have no 1x1 conv")
    if zero_init_residual:
        probe = norm(64)
        if not isinstance(getattr(probe, "weight", None), nn.Parameter):
            raise ValueError(f"zero_init_residual needs a norm with a trainable scale, got {type(probe).__name__}: "
                             "a frozen or absent scale would keep every residual branch at zero")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1):
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")


BLOCKS = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}


class ResNet(Backbone):
    """Stem + four residual stages, optional avgpool + fc classifier (output key `"logits"`).

    Args:
        block: "basic" or "bottleneck".
        layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        residual: False builds the paper's plain net (same layers, no shortcuts).
        shortcut: "A" zero-padding identity, "B" projection when the shape changes (None: "B"), "C" all
            projections; refused on plain nets, which have no shortcuts.
        zero_init_residual: start every residual branch at zero (last BN scale, or last conv for
            pre-activation blocks); refused on plain nets (it would zero every output) and with norms that
            have no trainable scale (FrozenBN, none).
        groups, width_per_group: ResNeXt / wide bottlenecks; refused for basic blocks, which have no grouped conv.
        output_stride: 32, 16 or 8; 16 and 8 dilate res5 (and res4) instead of striding (DeepLab).
        preact: pre-activation blocks, with a final BN-ReLU closing res5.
    """

    def __init__(self, block: str, layers: tuple[int, int, int, int], *, norm: NormFactory = nn.BatchNorm2d,
                 residual: bool = True, shortcut: str | None = None, stride_in_1x1: bool = False,
                 output_stride: int = 32, groups: int = 1, width_per_group: int = 64, zero_init_residual: bool = False,
                 preact: bool = False, num_classes: int | None = None) -> None:
        super().__init__()
        _check_combination(block, norm, residual=residual, shortcut=shortcut, stride_in_1x1=stride_in_1x1,
                           groups=groups, width_per_group=width_per_group, zero_init_residual=zero_init_residual,
                           num_classes=num_classes)
        shortcut = shortcut or "B"
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r} is not one of {list(SHORTCUTS)}")
        dilate = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
        if output_stride not in dilate:
            raise ValueError(f"output_stride={output_stride!r} is not one of {list(dilate)}")
        block_cls = BLOCKS[(block, preact)]
        self._block_kwargs = dict(norm=norm, residual=residual, groups=groups, base_width=width_per_group,
                                  stride_in_1x1=stride_in_1x1)
        self._shortcut = shortcut if residual else None

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_specs["stem"] = ShapeSpec(64, 4)
        self.stage_modules["stem"] = ["conv1", "bn1"]

        in_channels, stride_so_far, dilation = 64, 4, 1
        for index, (planes, num_blocks, use_dilation) in enumerate(
            zip((64, 128, 256, 512), layers, (False, *dilate[output_stride]))
        ):
            stride, previous_dilation = (1 if index == 0 else 2), dilation
            if use_dilation:
                dilation, stride = dilation * stride, 1
            layer = self._make_layer(block_cls, in_channels, planes, num_blocks, stride, previous_dilation, dilation)
            self.add_module(f"layer{index + 1}", layer)
            in_channels = planes * block_cls.expansion
            stride_so_far *= stride
            self.stage_specs[f"res{index + 2}"] = ShapeSpec(in_channels, stride_so_far)
            self.stage_modules[f"res{index + 2}"] = [f"layer{index + 1}"]

        # Pre-activation nets end in an un-normalised sum: close res5 with BN-ReLU (as the 2016 paper does).
        self.post_norm = norm(in_channels) if preact else None
        if preact:
            self.stage_modules["res5"].append("post_norm")

        self.num_classes = num_classes
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(in_channels, num_classes)

        self._init_weights(zero_init_residual)

    def _make_layer(self, block_cls: type[nn.Module], in_channels: int, planes: int, num_blocks: int,
                    stride: int, first_dilation: int, dilation: int) -> nn.Sequential:
        """One stage; like torchvision, a dilated stage's first block keeps the previous dilation."""
        norm = self._block_kwargs["norm"]
        blocks = []
        for i in range(num_blocks):
            block_stride = stride if i == 0 else 1
            out_channels = planes * block_cls.expansion
            shortcut = None
            if self._shortcut is not None:
                shortcut = make_shortcut(self._shortcut, in_channels, out_channels, block_stride, norm)
            blocks.append(block_cls(in_channels, planes, stride=block_stride, downsample=shortcut,
                                    dilation=first_dilation if i == 0 else dilation, **self._block_kwargs))
            in_channels = out_channels
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """He (Kaiming) initialisation, as in the paper (§3.4) and torchvision."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):  # SyncBatchNorm included
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        if zero_init_residual:
            for module in self.modules():
                if hasattr(module, "zero_init_last"):
                    module.zero_init_last()

    @property
    def has_classifier(self) -> bool:
        return self.num_classes is not None

    def pop_res5(self) -> nn.Sequential:
        """Hand res5 to a per-RoI box head (the paper's C4 Faster R-CNN); the backbone then ends at res4."""
        if self.has_classifier or "res5" in self.out_features:
            raise ValueError("pop_res5 needs a backbone without classifier whose out_features exclude res5")
        res5 = self.layer4 if self.post_norm is None else nn.Sequential(*self.layer4, self.post_norm, nn.ReLU(inplace=True))
        del self.layer4
        self.post_norm = None
        del self.stage_specs["res5"], self.stage_modules["res5"]
        return res5

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x)
        wanted = set(self.out_features)
        outputs: dict[str, Tensor] = {}
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x)))
        if "stem" in wanted:
            outputs["stem"] = x
        stages = list(self.stage_specs)
        last = len(stages) - 1 if "logits" in wanted else max(stages.index(n) for n in wanted)
        for index in range(last):  # stages[index + 1] is res{index + 2}
            name = stages[index + 1]
            x = getattr(self, f"layer{index + 1}")(x)
            if name == "res5" and self.post_norm is not None:
                x = self.relu(self.post_norm(x))
            if name in wanted:
                outputs[name] = x
        if "logits" in wanted:
            outputs["logits"] = self.fc(torch.flatten(self.avgpool(x), 1))
        return outputs
