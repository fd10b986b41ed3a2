"""Image decoding shared by the detection and segmentation datasets, the error bad data raises, and the images
a prediction is asked for (files, folders, glob patterns, a COCO json's list).

EXIF policy (one for images, masks and annotation sizes): pixels are used as stored, the EXIF
orientation tag is ignored. COCO and VOC annotations are made in stored-pixel coordinates (their
tools, and PIL, which reads our masks and classification images, ignore the tag too); OpenCV would
rotate JPEGs by default and misalign them with their boxes and masks, so `read_image` tells it not to.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import struct
from collections.abc import Sequence
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

    def __init__(self, message: str) -> None:
        # torch's DataLoader re-raises a worker's exception in the main process as the same type built from
        # "Caught DatasetError in DataLoader worker process N.\nOriginal Traceback ...\n...DatasetError: <ours>":
        # keep ours, so a bad file met by a worker reads as it does with num_workers=0
        wrapped = re.fullmatch(r"Caught DatasetError in DataLoader worker process \d+\.\nOriginal Traceback .*"
                               r"\n[\w.]*DatasetError: ([^\n]*)\n?", message, re.S)
        super().__init__(wrapped[1] if wrapped else message)


TRIM_EVERY = 128
"""Images a process reads between two `malloc_trim` calls (see `_trim_heap`)."""
_libc = ctypes.CDLL(None) if hasattr(ctypes.CDLL(None), "malloc_trim") else None  # glibc only
_reads = 0


def _trim_heap() -> None:
    """Every TRIM_EVERY reads, hand the heap's free pages back to the OS (glibc `malloc_trim`). Image buffers
    (decoded, resized, float: MBs each, of sizes that change with multi-scale training) are served from glibc's
    heap, whose free pieces stay resident: a DataLoader worker's memory rose by 40-70 MiB per 1,000 iterations
    (docs/benchmarks.md, "COCO scale"). Forcing them into mmap instead (a fixed M_MMAP_THRESHOLD) stops that,
    but page-faulting every buffer anew made a worker 3x slower; a trim now and then costs ~1 %."""
    global _reads
    _reads += 1
    if _libc is not None and _reads % TRIM_EVERY == 0:
        _libc.malloc_trim(0)


def read_image(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB (grayscale files are expanded to 3 channels), decoded with OpenCV, EXIF orientation
    ignored (see the module docstring). From the file's bytes (`imdecode`): the same pixels as `imread` at the same
    speed, but a truncated JPEG fails instead of coming back silently padded with grey (`imread` only warns)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        data = np.zeros(0, np.uint8)
    image = cv2.imdecode(data, READ_FLAGS) if data.size else None
    _trim_heap()
    if image is None:
        raise DatasetError(f"{path}: cannot read image (missing, truncated or not an image)")
    return image


JPEG_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
"""SOFn: the JPEG segments that hold the image size (every n but DHT C4, JPG C8 and DAC CC)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {(0, 1): "1", (0, 8): "L", (0, 16): "I;16", (2, 8): "RGB", (2, 16): "RGB", (3, 1): "P", (3, 2): "P",
             (3, 4): "P", (3, 8): "P", (4, 8): "LA", (4, 16): "LA", (6, 8): "RGBA", (6, 16): "RGBA"}
"""PIL's mode for a PNG (colour type, bit depth) from its IHDR chunk."""
JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def read_header(path: str | Path) -> dict:
    """{"format", "size": [width, height], "mode"} of an image file from its first bytes, without decoding:
    JPEG and PNG parsed here (~5x faster than PIL.Image.open, which matters for 100k+ files at start-up), other
    formats by PIL's lazy open. Raises OSError / ValueError (SyntaxError from PIL) when the header is unreadable."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if head.startswith(b"\xff\xd8"):
            return _jpeg_header(f, head)
        if head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 26:
            width, height, depth, colour = struct.unpack_from(">IIBB", head, 16)
            return {"format": "PNG", "size": [width, height], "mode": PNG_MODES.get((colour, depth), "?")}
    with Image.open(path) as image:
        return {"format": image.format, "size": list(image.size), "mode": image.mode}


def _jpeg_header(f, data: bytes) -> dict:
    """Walk the marker segments from the start of the file to the frame header (SOFn), which holds the size."""
    base, pos = 0, 2  # data[0] is byte `base` of the file
    while True:
        if pos + 10 > len(data):  # the next segment header lies past what was read: read on from it
            f.seek(base + pos)
            base, pos, data = base + pos, 0, f.read(4096)
            if len(data) < 10:
                raise ValueError(f"JPEG ends at byte {base + len(data)} before its frame header (truncated)")
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG has no marker at byte {base + pos}: corrupt header")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in JPEG_FRAME_MARKERS:
            height, width, components = struct.unpack_from(">HHB", data, pos + 5)
            return {"format": "JPEG", "size": [width, height], "mode": JPEG_MODES.get(components, "?")}
        elif marker in (0xD9, 0xDA):
            raise ValueError("JPEG has no frame header before its image data: corrupt header")
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            pos += 2
        else:
            length = struct.unpack_from(">H", data, pos + 2)[0]
            if length < 2:
                raise ValueError(f"JPEG segment at byte {base + pos} has length {length}: corrupt header")
            pos += 2 + length


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


INPUT_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}  # the images of an input folder
GLOB_CHARS = set("*?[")


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given, folders' images (recursively, sorted), glob patterns' matches (sorted). A path that is
    neither is kept, so it is reported as unreadable rather than silently dropped."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_IMAGE_SUFFIXES)
        elif not path.exists() and GLOB_CHARS & set(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            paths += [p for p in matches if p.is_file()] or [path]
        else:
            paths.append(path)
    return list(dict.fromkeys(paths))  # a file named twice is predicted once


def annotated_images(annotations: Path, folders: Sequence[str]) -> tuple[list[tuple[int, Path]], list[str]]:
    """(image_id, path) of every image in a COCO json, found under the first folder that has it; images found
    nowhere are returned as unreadable lines."""
    data = json.loads(Path(annotations).read_text())
    found, missing = [], []
    for image in data["images"]:
        candidates = [Path(folder) / image["file_name"] for folder in folders]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{image['file_name']} (image id {image['id']}): not found in {list(folders)}")
        else:
            found.append((int(image["id"]), path))
    return found, missing
