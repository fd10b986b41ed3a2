"""Image decoding shared by the detection and segmentation datasets and predictors, and the error bad data raises."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

ImageInput = str | Path | np.ndarray | Image.Image
"""What the predictors take: a file, an HxWx3 uint8 RGB (or HxW grey) array, or a PIL image."""


class DatasetError(ValueError):
    """A dataset file or annotation is unusable; the message names the file (and the object)."""


def read_image(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB (grayscale files are expanded to 3 channels), decoded with OpenCV, which applies
    the EXIF orientation."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot read image (missing, truncated or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def as_rgb_array(image: ImageInput) -> np.ndarray:
    """HxWx3 uint8 RGB from any predictor input, upright as the datasets see it: files through `read_image`,
    PIL images EXIF-rotated the same way, arrays taken as they are (grey expanded to 3 channels)."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {array.dtype} {array.shape}")
    return array
