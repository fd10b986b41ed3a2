"""PASCAL VOC class names, colour map and label-PNG helpers.

VOC `SegmentationClass` files are 8-bit palette ('P') PNGs: the pixel value is the class index,
255 is void, and the palette only affects how viewers show them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

VOID = 255
"""Label value of pixels that are neither scored nor trained on (object borders, crowds, padding)."""

VOC_SEG_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map ([n, 3] uint8): bits of the class index spread over R, G, B.

    Hand-written: the VOC devkit's `labelcolormap` is MATLAB and no installed library ships it.
    """
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


_PALETTE = voc_palette()


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class-index mask [H, W] -> RGB image [H, W, 3] in VOC colours (void is VOC's cream)."""
    return _PALETTE[np.asarray(mask, dtype=np.uint8)]


def overlay(image_rgb_uint8: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an RGB uint8 image; void pixels keep the original image."""
    mask = np.asarray(mask)
    blended = (1 - alpha) * image_rgb_uint8 + alpha * colorize(mask)
    out = np.where((mask == VOID)[..., None], image_rgb_uint8, blended)
    return out.round().astype(np.uint8)


def save_palette_png(path: str | Path, mask: np.ndarray) -> None:
    """Write a class-index mask as a VOC-style palette PNG (values kept as palette indices)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"{path}: a label PNG needs a 2-D mask with values in 0..255")
    image = Image.fromarray(mask.astype(np.uint8))  # mode 'L'
    image.putpalette(_PALETTE.tobytes())  # turns the 'L' image into 'P' without touching indices
    image.save(path)
