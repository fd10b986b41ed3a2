"""VGG-16, the paper's detection baseline, laid out exactly like torchvision's `vgg16` / `vgg16_bn`.

Stages `conv1`..`conv5` each start with the max-pool that precedes them, so `conv5` is conv5_3 at
stride 16: the feature map Faster R-CNN used with VGG-16. pool5 only runs for the classifier.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .base import Backbone, ShapeSpec, check_input

# torchvision's configuration "D": channels per conv, "M" = max-pool
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(Backbone):
    """`norm=None` is the original vgg16 (the paper's baseline); a norm factory gives the vgg16_bn
    layout (conv-norm-ReLU)."""

    def __init__(self, *, norm: Callable[[int], nn.Module] | None = None, num_classes: int | None = None,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        stage_starts: list[int] = [0]
        in_channels = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                stage_starts.append(len(layers))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(in_channels, item, kernel_size=3, padding=1))
            if norm is not None:
                layers.append(norm(item))
            layers.append(nn.ReLU(inplace=True))
            in_channels = item
        self.features = nn.Sequential(*layers)
        # (start, end) index ranges into `features`; the last pool (pool5) belongs to the classifier
        self._stage_ranges = list(zip(stage_starts[:5], stage_starts[1:6]))
        for index, (start, end) in enumerate(self._stage_ranges):
            name = f"conv{index + 1}"
            channels = next(m.out_channels for m in reversed(layers[start:end]) if isinstance(m, nn.Conv2d))
            self.stage_specs[name] = ShapeSpec(channels, 2**index)
            self.stage_modules[name] = [f"features.{i}" for i in range(start, end)]

        self.num_classes = num_classes
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),  # fc6
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),  # fc7
                nn.Linear(4096, num_classes),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's VGG initialisation (He normal for convs)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.constant_(module.bias, 0)

    @property
    def has_classifier(self) -> bool:
        return self.num_classes is not None

    @property
    def size_divisibility(self) -> int:
        return 32 if "logits" in self.out_features else 16

    def pop_fc_layers(self) -> nn.Sequential:
        """Hand fc6 + fc7 (with their ImageNet weights) to a detection head; drops the classifier."""
        if not self.has_classifier:
            raise ValueError("pop_fc_layers needs a VGG16 built with num_classes (the fc layers live in the classifier)")
        fc_layers = self.classifier[:6]
        del self.classifier, self.avgpool
        self.num_classes = None
        if "logits" in self.out_features:
            self.set_out_features([n for n in self.out_features if n != "logits"] or ["conv5"])
        return fc_layers

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x)
        wanted = set(self.out_features)
        outputs: dict[str, Tensor] = {}
        stages = list(self.stage_specs)
        last = len(stages) - 1 if "logits" in wanted else max(stages.index(n) for n in wanted)
        for name, (start, end) in zip(stages[: last + 1], self._stage_ranges):
            for layer in self.features[start:end]:  # the registered layers themselves (FX tracing looks them up)
                x = layer(x)
            if name in wanted:
                outputs[name] = x
        if "logits" in wanted:
            for layer in self.features[self._stage_ranges[-1][1]:]:  # pool5
                x = layer(x)
            outputs["logits"] = self.classifier(torch.flatten(self.avgpool(x), 1))
        return outputs
