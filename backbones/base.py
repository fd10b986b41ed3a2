"""The backbone contract every task head builds on: named stages in, named feature maps out."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .batch_norm import convert_frozen_batchnorm


class ShapeSpec(NamedTuple):
    """Channels and stride (w.r.t. the input image) of one feature map."""

    channels: int
    stride: int


@dataclass(frozen=True)
class Preprocessing:
    """What a set of weights expects its input to look like.

    Stored with every checkpoint: feeding RGB 0..1 images to Caffe-style BGR 0..255 weights
    silently costs ~15 mAP, so the detector/segmenter/classifier normalise with *these* numbers.
    `pixel_mean` / `pixel_std` are for input scaled to [0, 1].
    """

    channel_order: str = "RGB"
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(d["channel_order"], tuple(d["pixel_mean"]), tuple(d["pixel_std"]))

    def normalize(self, images: Tensor) -> Tensor:
        """[N,3,H,W] RGB images in [0,1] -> the tensor these weights expect."""
        if self.channel_order == "BGR":
            images = images.flip(-3)
        mean = images.new_tensor(self.pixel_mean).view(-1, 1, 1)
        std = images.new_tensor(self.pixel_std).view(-1, 1, 1)
        return (images - mean) / std


class Backbone(nn.Module):
    """A feature extractor whose `forward` returns `{stage_name: Tensor}` for `out_features`.

    Subclasses fill `stage_specs` (every stage in forward order, name -> ShapeSpec) and
    `stage_modules` (name -> dotted module paths owning that stage's parameters), and may add a
    classification head that adds the `"logits"` output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stage_specs: dict[str, ShapeSpec] = {}
        self.stage_modules: dict[str, list[str]] = {}
        self.out_features: tuple[str, ...] = ()
        self.preprocessing = Preprocessing()

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {name: self.stage_specs[name] for name in self.out_features if name in self.stage_specs}

    @property
    def size_divisibility(self) -> int:
        """Pad inputs to a multiple of this so every stage has an integer size."""
        return max(spec.stride for spec in self.stage_specs.values())

    def set_out_features(self, out_features: tuple[str, ...] | list[str]) -> None:
        valid = list(self.stage_specs) + (["logits"] if self.has_classifier else [])
        unknown = [name for name in out_features if name not in valid]
        if unknown or not out_features:
            raise ValueError(f"out_features {list(out_features)!r}: unknown {unknown}; valid names are {valid}")
        self.out_features = tuple(out_features)

    @property
    def has_classifier(self) -> bool:
        return False

    def freeze(self, freeze_at: int) -> None:
        """Freeze the first `freeze_at` stages (Detectron2 convention: 1 = stem, 2 = stem + res2).

        Frozen stages get `requires_grad=False` and their BatchNorms become FrozenBatchNorm2d, so
        neither weights nor statistics move during fine-tuning.
        """
        names = list(self.stage_specs)
        if not isinstance(freeze_at, int) or isinstance(freeze_at, bool) or not 0 <= freeze_at <= len(names):
            raise ValueError(f"freeze_at={freeze_at} must be in [0, {len(names)}] (stages {names})")
        for stage in names[:freeze_at]:
            for path in self.stage_modules[stage]:
                module = convert_frozen_batchnorm(self.get_submodule(path))
                module.requires_grad_(False)
                self.set_submodule(path, module)

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def check_input(x: Tensor) -> None:
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing (int8 quantisation): there is no shape to check yet
        return
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"backbones take [N, 3, H, W] images, got shape {tuple(x.shape)}")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(module: nn.Module, input_size: tuple[int, int] = (224, 224)) -> int:
    """Multiply-accumulates of one forward pass (convs and linears; the paper's 'FLOPs')."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        module(torch.zeros(1, 3, *input_size))
    module.train(was_training)
    return counter.get_total_flops() // 2
