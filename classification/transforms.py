"""Classification transforms: PIL image in, float RGB tensor in [0, 1] out.

No mean/std normalisation here: the model normalises with the backbone's stored
`Preprocessing`, so the same pipeline serves RGB/0..1 and Caffe-style BGR weights.

Ten-crop eval yields [10, 3, H, W] per image; torch's default collate stacks that to
[N, 10, 3, H, W] (no custom collate needed). Run the model on `x.flatten(0, 1)`, reshape the
logits to [N, 10, C] and hand them to `metrics.average_crops` / `topk_correct`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

RECIPES = ("paper", "small", "cifar")

# AlexNet PCA colour augmentation: eigen-decomposition of the ImageNet RGB pixel covariance
# (pixels in [0, 1]), values as used by fb.resnet.torch, the reference ResNet training code.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class PCALighting(v2.Transform):
    """AlexNet "standard colour augmentation" (Krizhevsky et al. 2012, §4.1), used by He et al. §3.4.

    Hand-written: torchvision has no PCA lighting transform. Adds `eigvec @ (alpha * eigval)` with
    alpha ~ N(0, std) to every pixel of a float RGB image in [0, 1], then clamps back to [0, 1]
    so the output contract of this module holds.
    """

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = std
        self.register_buffer("eigval", torch.tensor(IMAGENET_EIGVAL))
        self.register_buffer("eigvec", torch.tensor(IMAGENET_EIGVEC))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"alpha": torch.randn(3) * self.std}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        rgb = self.eigvec @ (params["alpha"] * self.eigval)
        return (inpt + rgb.to(inpt).view(3, 1, 1)).clamp_(0.0, 1.0)


def build_cls_transforms(
    train: bool, *, image_size: int = 224, recipe: str = "paper", ten_crop: bool = False
) -> Callable:
    """Build the train or eval pipeline of `recipe`.

    - "paper" (He et al. 2016 §3.4): train resizes the shorter side to a random integer in
      [256, 480] (scaled by image_size/224), random-crops `image_size`, flips, adds PCA lighting;
      eval resizes the shorter side to 256*image_size/224 and centre-crops (or ten-crops).
    - "small" (64x64 data such as Tiny-ImageNet, where the paper's scale range would only
      upsample): train = RandomResizedCrop(image_size, scale=(0.35, 1)) + flip; eval = resize
      to image_size x image_size.
    - "cifar" (He et al. 2015 §4.2): resize to image_size x image_size (a no-op for CIFAR; 64 -> 32 for
      Tiny-ImageNet as the CIFAR stand-in), then train pads 4 px with zeros, random-crops image_size and flips;
      eval is the resized image. The paper's per-pixel mean subtraction is left to the model's per-channel
      `Preprocessing` (a per-pixel mean image would be a dataset statistic outside the backbone checkpoint;
      for CIFAR it is nearly constant over pixels, so per-channel is the usual stand-in).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown transform recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    if ten_crop and (train or recipe != "paper"):
        raise ValueError("ten_crop is an eval option of the 'paper' recipe")
    to_float = v2.ToDtype(torch.float32, scale=True)
    # Geometric ops run on uint8 tensors (cheaper than on float), then convert to [0, 1].
    steps: list[Callable] = [v2.ToImage()]
    if recipe == "paper":
        scale = image_size / 224
        if train:
            lo, hi = round(256 * scale), round(480 * scale)
            steps += [
                v2.RandomResize(lo, hi + 1),  # resizes the shorter side; upper bound is exclusive
                v2.RandomCrop(image_size),
                v2.RandomHorizontalFlip(),
                to_float,
                PCALighting(std=0.1),
            ]
        elif ten_crop:
            steps += [v2.Resize(round(256 * scale)), v2.TenCrop(image_size), to_float, torch.stack]
        else:
            steps += [v2.Resize(round(256 * scale)), v2.CenterCrop(image_size), to_float]
    elif recipe == "cifar":
        steps.append(v2.Resize((image_size, image_size)))
        if train:
            steps += [v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()]
        steps.append(to_float)
    elif train:
        steps += [v2.RandomResizedCrop(image_size, scale=(0.35, 1.0)), v2.RandomHorizontalFlip(), to_float]
    else:
        steps += [v2.Resize((image_size, image_size)), to_float]
    return v2.Compose([*steps, v2.ToPureTensor()])
