"""Image decoding shared by the detection and segmentation datasets, and the error bad data raises.

EXIF policy (one for images, masks and annotation sizes): pixels are used as stored, the EXIF
orientation tag is ignored. COCO and VOC annotations are made in stored-pixel coordinates (their
tools, and PIL, which reads our masks and classification images, ignore the tag too); OpenCV would
rotate JPEGs by default and misalign them with their boxes and masks, so `read_image` tells it not to.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ImageInput = str | Path | np.ndarray | Image.Image
"""What the predictors take: a file, an HxWx3 uint8 RGB (or HxW grey; uint16: 16-bit) array, or a PIL image."""

EXIF_HINT = ("an EXIF orientation tag is the likely cause: ResDet reads pixels as stored and ignores the tag, as the "
             "COCO/VOC tools do; re-save the image with the rotation applied and the tag removed "
             "(PIL.ImageOps.exif_transpose, exiftran -ai) and fix its annotation, or correct the annotation")


READ_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
"""How `read_image` decodes: 3 channels in RGB order, full resolution (never IMREAD_REDUCED_*: not exact), the
EXIF orientation ignored. The decoder writes RGB itself: the same pixels as BGR + cvtColor, one pass fewer."""


class DatasetError(ValueError):
    """A dataset file or annotation is unusable; the message names the file (and the object)."""


def read_image(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB (grayscale files are expanded to 3 channels), decoded with OpenCV, EXIF orientation
    ignored (see the module docstring)."""
    image = cv2.imread(str(path), READ_FLAGS)
    if image is None:
        raise DatasetError(f"{path}: cannot read image (missing, truncated or not an image)")
    return image


def size_mismatch(path: str | Path, actual: tuple[int, int], expected: tuple[int, int], where: str) -> str:
    """The message for an image whose (width, height) is not what its annotation says."""
    message = (f"{path}: image is {actual[0]}x{actual[1]} (WxH) but {where} says {expected[0]}x{expected[1]}")
    if tuple(actual) == tuple(expected)[::-1]:
        return f"{message}; width and height are swapped: {EXIF_HINT}"
    return f"{message}; fix the annotation's size (or the image), or set data.skip_invalid=true to skip it"


def inside(folder: str | Path, name: str, where: str) -> Path:
    """``folder / name``, refused when ``name`` is absolute or climbs out of ``folder`` (``../../etc/hostname``):
    annotation files must not make us read files elsewhere."""
    # lexical, not resolve(): a dataset may legitimately hold symlinks to files stored elsewhere
    normal = os.path.normpath(name)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        raise DatasetError(f"{where}: file name {name!r} points outside the image folder {folder}; "
                           "annotation file names must be relative paths inside it")
    return Path(folder) / name


def as_rgb_array(image: ImageInput) -> np.ndarray:
    """HxWx3 uint8 RGB from any predictor input, pixels as the datasets see them: files through `read_image`,
    PIL images as stored (the EXIF orientation ignored, the module's policy), arrays taken as they are (grey
    expanded to 3 channels). 16-bit pixels (uint16 arrays, PIL modes I;16*) keep their high byte, as OpenCV
    decodes a 16-bit PNG for the datasets; 32-bit and float pixels (PIL modes I and F), which the datasets cannot
    read either, and other dtypes are a TypeError; an empty image or another shape a ValueError."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        if image.mode in ("I", "F"):
            raise TypeError(f"PIL image of mode {image.mode!r} (32-bit {'float' if image.mode == 'F' else 'integer'} "
                            "pixels): the range of its values is unknown, so it is not guessed; give 8-bit RGB or grey "
                            "(or 16-bit, mode I;16)")
        array = np.asarray(image) if image.mode.startswith("I;16") else np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image)
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # either byte order (PIL's I;16B is big-endian)
        array = (array.astype(np.uint16) >> 8).astype(np.uint8)
    if array.dtype != np.uint8:
        raise TypeError(f"image of dtype {array.dtype}: expected uint8 RGB (or uint16, reduced to its high byte as the "
                        "datasets read 16-bit PNGs); convert it first, e.g. (x * 255).round().astype(np.uint8) "
                        "for floats in 0..1")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB or HxW grey image, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"the image is empty ({array.shape[1]}x{array.shape[0]} pixels, WxH)")
    return array


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> the contiguous float32 [3, H, W] tensor in [0, 1] the models take, `x / 255` exactly.

    Per channel plane (OpenCV's SIMD de-interleave, then one numpy pass that converts and divides): faster than
    a transposed uint8 copy followed by `.float().div_(255)`, with the same bits (docs/benchmarks.md, "Data
    pipeline"). Contiguous on purpose: a [3, H, W] view of HWC memory is cheaper still, but moves the transpose
    into whatever consumes the batch (the training process)."""
    height, width = image.shape[:2]
    tensor = torch.empty((3, height, width), dtype=torch.float32)
    planes = tensor.numpy()
    for plane, channel in zip(planes, cv2.split(image)):
        np.divide(channel, np.float32(255), out=plane, dtype=np.float32)
    return tensor
