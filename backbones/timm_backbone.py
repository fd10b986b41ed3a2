"""Any timm model as a Backbone, through `timm.create_model(features_only=True)`.

timm returns a list of feature maps; we name them by their nominal stride so detection and
segmentation heads see the same `stem`/`res2`..`res5` contract as our own ResNets.
"""
from __future__ import annotations

import timm
import torch
from torch import Tensor

from .base import Backbone, Preprocessing, ShapeSpec, check_input

STRIDE_NAMES = {2: "stem", 4: "res2", 8: "res3", 16: "res4", 32: "res5"}


def stage_names(reductions: list[int]) -> list[str]:
    """Names by nominal stride; models whose features share a stride (e.g. ViTs) get `stage{i}`."""
    names = [STRIDE_NAMES.get(r) for r in reductions]
    if None in names or len(set(names)) != len(names):
        return [f"stage{i}" for i in range(len(reductions))]
    return names  # type: ignore[return-value]


class TimmBackbone(Backbone):
    """Wraps a timm `features_only` model.

    Args:
        model_name: any timm model name, e.g. "resnet50", "convnext_tiny", "resnet50d".
        weights: a local timm checkpoint file loaded by timm itself (its key remapping applies).
        output_stride: 32, 16 or 8 where the model supports dilation.
    """

    def __init__(self, model_name: str, *, weights: str | None = None, output_stride: int = 32) -> None:
        super().__init__()
        if model_name not in timm.list_models():
            close = timm.list_models(f"*{model_name}*")[:10]
            raise ValueError(f"timm has no model {model_name!r}; similar names: {close}")
        kwargs = {"features_only": True}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if weights:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
        self.body = timm.create_model(model_name, **kwargs)
        info = self.body.feature_info
        with torch.device("meta"):  # nominal strides name the stages, also when dilated
            nominal = timm.create_model(model_name, features_only=True).feature_info.reduction()
        names = stage_names(nominal)
        children = [name for name, _ in self.body.named_children()]
        start = 0
        for name, channels, stride, module_name in zip(names, info.channels(), info.reduction(), info.module_name()):
            self.stage_specs[name] = ShapeSpec(channels, stride)
            # a stage owns every child module from the previous stage's end up to its own output module
            flat = module_name.replace(".", "_")
            end = children.index(flat) + 1 if flat in children else start
            self.stage_modules[name] = [f"body.{child}" for child in children[start:end]]
            start = end
        config = self.body.pretrained_cfg
        self.preprocessing = Preprocessing("RGB", tuple(config.get("mean", Preprocessing.pixel_mean)),
                                           tuple(config.get("std", Preprocessing.pixel_std)))

    def freeze(self, freeze_at: int) -> None:
        empty = [name for name in list(self.stage_specs)[:freeze_at] if not self.stage_modules[name]]
        if empty:
            raise ValueError(f"cannot freeze timm stages {empty}: their modules are nested inside the feature wrapper")
        super().freeze(freeze_at)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        check_input(x)
        features = self.body(x)
        return {name: f for name, f in zip(self.stage_specs, features) if name in self.out_features}
