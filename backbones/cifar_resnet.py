"""The paper's CIFAR-10 networks (He et al. 2015, §4.2, Table 6): ResNet-20 ... 1202 and their plain twins.

A 3x3 conv with 16 filters, then three stages of n basic blocks on 32x32, 16x16 and 8x8 maps (16, 32, 64
channels), global average pooling and an fc: 6n + 2 weighted layers. Shortcuts are option A by default
(parameter-free: identity, subsampled and zero-padded when the shape changes), as in the paper.
Stages are named like the ImageNet ResNets (`stem`, `res2`..`res4`), so the `Backbone` contract holds:
`res2` has stride 1, `res3` 2, `res4` 4.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Backbone, ShapeSpec, check_input
from .resnet import SHORTCUTS, BasicBlock, NormFactory, conv3x3, make_shortcut

# name -> blocks per stage (n); depth = 6n + 2
CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18, 1202: 200}
CIFAR_NETS: dict[str, tuple[int, bool]] = {f"resnet{d}": (n, True) for d, n in CIFAR_DEPTHS.items()}
CIFAR_NETS.update({f"plain{d}": (n, False) for d, n in CIFAR_DEPTHS.items() if d <= 110})  # the paper's plain nets


class CifarResNet(Backbone):
    """Stem (3x3 conv, 16) + three stages of `blocks_per_stage` BasicBlocks; `residual=False` is the plain net.

    Reuses the ImageNet ResNet's BasicBlock and shortcut code; only the stem and widths differ.
    """

    def __init__(self, blocks_per_stage: int, *, norm: NormFactory = nn.BatchNorm2d, residual: bool = True,
                 shortcut: str = "A", zero_init_residual: bool = False, num_classes: int | None = None) -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r} is not one of {list(SHORTCUTS)}")
        self.conv1 = conv3x3(3, 16)
        self.bn1 = norm(16)
        self.relu = nn.ReLU(inplace=True)
        self.stage_specs["stem"] = ShapeSpec(16, 1)
        self.stage_modules["stem"] = ["conv1", "bn1"]

        in_channels = 16
        for index, (planes, stride) in enumerate(zip((16, 32, 64), (1, 2, 2))):
            blocks = []
            for i in range(blocks_per_stage):
                block_stride = stride if i == 0 else 1
                downsample = make_shortcut(shortcut, in_channels, planes, block_stride, norm) if residual else None
                blocks.append(BasicBlock(in_channels, planes, stride=block_stride, downsample=downsample,
                                         residual=residual, norm=norm))
                in_channels = planes
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            self.stage_specs[f"res{index + 2}"] = ShapeSpec(planes, 2**index)
            self.stage_modules[f"res{index + 2}"] = [f"layer{index + 1}"]

        self.num_classes = num_classes
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """He initialisation (the paper's §3.4, also used for CIFAR); optionally zero the last BN of each block."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock) and isinstance(module.bn2, (nn.BatchNorm2d, nn.GroupNorm)):
                    nn.init.constant_(module.bn2.weight, 0)

    @property
    def has_classifier(self) -> bool:
        return self.num_classes is not None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x)
        wanted = set(self.out_features)
        outputs: dict[str, Tensor] = {}
        x = self.relu(self.bn1(self.conv1(x)))
        if "stem" in wanted:
            outputs["stem"] = x
        stages = list(self.stage_specs)
        last = len(stages) - 1 if "logits" in wanted else max(stages.index(n) for n in wanted)
        for index in range(last):  # stages[index + 1] is res{index + 2}
            x = getattr(self, f"layer{index + 1}")(x)
            if stages[index + 1] in wanted:
                outputs[stages[index + 1]] = x
        if "logits" in wanted:
            outputs["logits"] = self.fc(torch.flatten(self.avgpool(x), 1))
        return outputs
