"""Detection augmentations: shortest-side resize with a longest-side cap, plus horizontal flip when training.

Everything runs through albumentations so the boxes (pascal_voc = xyxy pixels, x2/y2 exclusive) follow the
image exactly. Output stays numpy HxWx3 uint8; `DetectionDataset` turns it into a [0, 1] tensor.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A


class ResizeShortestEdge(A.SmallestMaxSize):
    """Scale so the shortest side is `max_size` (a random pick when it is a list), unless that pushes the longest
    side past `longest`: then the longest side is `longest` (torchvision GeneralizedRCNNTransform's rule).

    Hand-written because albumentations has no single transform for it, and `SmallestMaxSize` followed by
    `LongestMaxSize` would also *upscale* every image until its longest side equals the cap.
    """

    def __init__(self, shortest: int | Sequence[int], longest: int, p: float = 1.0):
        super().__init__(max_size=shortest if isinstance(shortest, int) else list(shortest), p=p)
        self.longest = longest

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        scale = super().get_params_dependent_on_data(params, data)["scale"]
        height, width = params["shape"][:2]
        return {"scale": min(scale, self.longest / max(height, width))}

    def get_transform_init_args(self) -> dict[str, Any]:
        return {"shortest": self.max_size, "longest": self.longest}


def build_det_transforms(train: bool, min_size: int | Sequence[int], max_size: int,
                         flip_prob: float = 0.5) -> A.Compose:
    """Training: multi-scale (shortest side drawn from `min_size`) + horizontal flip. Evaluation: one scale, the
    largest of `min_size`. Call as `transform(image=rgb_uint8, bboxes=xyxy, labels=labels)`."""
    sizes = [min_size] if isinstance(min_size, int) else [int(s) for s in min_size]
    if not sizes or min(sizes) <= 0 or max_size <= 0:
        raise ValueError(f"min_size {min_size!r} and max_size {max_size!r} must be positive")
    steps: list[A.BasicTransform] = [ResizeShortestEdge(sizes if train else max(sizes), max_size)]
    if train:
        steps.append(A.HorizontalFlip(p=flip_prob))
    # clip=True trims float round-off at the border; boxes that collapse to nothing are dropped with their labels
    return A.Compose(steps, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True))
