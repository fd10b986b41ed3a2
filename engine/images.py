"""Image decoding shared by the detection and segmentation datasets, and the error bad data raises."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


class DatasetError(ValueError):
    """A dataset file or annotation is unusable; the message names the file (and the object)."""


def read_image(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB (grayscale files are expanded to 3 channels), decoded with OpenCV."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot read image (missing, truncated or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
