"""Joint image/mask augmentation for semantic segmentation (albumentations).

Albumentations resizes `mask` targets with nearest-neighbour, so labels stay class indices;
padding fills masks with void so padded pixels are neither trained on nor scored.
"""

from __future__ import annotations

import albumentations as A
import cv2

from segmentation.palette import VOID


def build_seg_transforms(
    train: bool,
    crop_size: int,
    *,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: int | None = None,
    flip_prob: float = 0.5,
) -> A.Compose:
    """DeepLab-style pipeline: train = random scale, pad, random crop, flip; eval = full resolution.

    `base_size` (optional) first resizes the shorter side to it, in both modes, so the random
    scale is relative to it and eval sees the same object sizes as training.
    """
    resize = [] if base_size is None else [A.SmallestMaxSize(max_size=base_size)]
    if not train:
        return A.Compose(resize)
    low, high = scale_range
    return A.Compose([
        *resize,
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), p=1.0),  # albumentations adds 1
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            position="top_left",  # pad right/bottom, as the torchvision segmentation reference
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=VOID,
        ),
        A.RandomCrop(height=crop_size, width=crop_size),
        A.HorizontalFlip(p=flip_prob),
    ])
