"""Decode every image (and label PNG) of a split once, before the first iteration, so a bad file stops
the run at start-up naming itself, or is skipped and counted with ``data.skip_invalid=true``.

Decoding is strict (PIL raises on truncated data, where OpenCV/libjpeg only warn and return a half-grey
image), runs in a thread pool over the available cores (the decoders release the GIL), and is cached by
path + size + mtime in a JSON file outside the dataset (``$RESDET_CACHE`` or ``~/.cache/resdet``), so a
second run starts at once. Distributed runs: validate on the main process, barrier, then the other ranks
call the same function and find every file in the cache. Nothing is ever written into the data folder.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .images import DatasetError, size_mismatch

logger = logging.getLogger(__name__)

CACHE_FILE = "validated_files.json"
OPENCV_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
"""PIL format names of files OpenCV's `imread` also decodes (the detection / segmentation reader)."""


@dataclass(frozen=True)
class FileCheck:
    """One file to decode: `size` is the (width, height) the annotation expects (None: any), or
    `same_size_as` another file of the same call (an image and its mask); `label` marks a label PNG
    (class indices, 'P' or 'L' mode, values below `num_classes` or `void`); `opencv` a file the training
    reader opens with OpenCV; `where` names what refers to the file, for messages."""

    path: Path
    where: str
    size: tuple[int, int] | None = None
    same_size_as: Path | None = None
    label: bool = False
    num_classes: int | None = None
    void: int = 255
    opencv: bool = True


def default_cache_dir() -> Path:
    return Path(os.environ.get("RESDET_CACHE") or Path.home() / ".cache" / "resdet")


def validate_files(checks: Sequence[FileCheck], *, skip_invalid: bool, report_dir: str | Path | None = None,
                   split: str = "data", num_workers: int | None = None,
                   cache_dir: str | Path | None = None) -> tuple[set[int], dict[int, dict]]:
    """Decode every file once; returns (indices of skipped checks, decoded info per check index: `size`
    (w, h) and, for label PNGs, `values` (the sorted label values present)).

    Without `skip_invalid` the first bad file raises DatasetError naming it, its problem and what to do;
    with it every bad file is logged, counted, and listed in `report_dir/invalid_<split>.txt`.
    """
    cache_path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    cache = _read_cache(cache_path)
    stamps = {index: _stamp(check) for index, check in enumerate(checks)}
    info: dict[int, dict] = {}
    todo = []
    for index, check in enumerate(checks):
        hit = cache.get(_key(check))
        if stamps[index] is not None and hit is not None and hit["stamp"] == stamps[index]:
            info[index] = hit["info"]
        else:
            todo.append(index)
    workers = max(1, num_workers or len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(workers) as pool:
        decoded = pool.map(lambda i: _inspect(checks[i]), todo)
        for index, (result, problem) in zip(todo, tqdm(decoded, total=len(todo), desc=f"checking {split} files",
                                                       unit="file", disable=not todo)):
            if problem is None:
                info[index] = result
                cache[_key(checks[index])] = {"stamp": stamps[index], "info": result}
    if todo:
        _write_cache(cache_path, cache)

    size_of = {checks[i].path: tuple(found["size"]) for i, found in info.items()}
    skipped: dict[int, str] = {}
    for index, check in enumerate(checks):
        problem = _problem(check, info.get(index), size_of)
        if problem is None:
            continue
        if not skip_invalid:
            raise DatasetError(f"{problem} (or set data.skip_invalid=true to skip such files)")
        logger.warning("skipped: %s", problem)
        skipped[index] = problem
    if skipped:
        logger.warning("%s: skipped %d of %d file(s) (data.skip_invalid=true)%s", split, len(skipped), len(checks),
                       f"; list in {Path(report_dir) / f'invalid_{split}.txt'}" if report_dir else "")
        if report_dir is not None:
            Path(report_dir).mkdir(parents=True, exist_ok=True)
            (Path(report_dir) / f"invalid_{split}.txt").write_text("".join(f"{p}\n" for p in skipped.values()))
    return set(skipped), info


def _key(check: FileCheck) -> str:
    return f"{'label' if check.label else 'image'}:{Path(check.path).absolute()}"


def _stamp(check: FileCheck) -> list[int] | None:
    try:
        stat = os.stat(check.path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _inspect(check: FileCheck) -> tuple[dict | None, str | None]:
    """Decode one file fully; (info, None) or (None, why). Re-decoding a file that failed is cheap and
    keeps the message exact, so failures are recomputed in `_problem` rather than cached."""
    try:
        with Image.open(check.path) as image:
            image.load()  # raises on truncated data, unlike OpenCV
            info = {"size": list(image.size), "format": image.format, "mode": image.mode}
            if check.label and image.mode in ("P", "L"):
                info["values"] = np.unique(np.asarray(image)).tolist()
        return info, None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, f"{type(error).__name__}: {error}"


def _problem(check: FileCheck, info: dict | None, size_of: dict[Path, tuple[int, int]]) -> str | None:
    """Why `check.path` is unusable, or None. Every message names the file and what to do."""
    path = check.path
    if info is None:
        if not Path(path).is_file():
            return f"{path} (from {check.where}): file does not exist"
        if os.path.getsize(path) == 0:
            return f"{path} (from {check.where}): file is empty (0 bytes); re-copy or re-download it"
        _, why = _inspect(check)
        return (f"{path} (from {check.where}): cannot decode ({why}): the file is truncated, corrupt or not an "
                "image; re-copy or re-download it, or remove it from the annotations")
    if check.opencv and not check.label and info["format"] not in OPENCV_FORMATS:
        return (f"{path} (from {check.where}): {info['format']} images are not read by the training reader "
                f"(OpenCV); convert it to JPEG or PNG")
    if check.label and info["mode"] not in ("P", "L"):
        return (f"{path} (from {check.where}): label file has mode {info['mode']!r}; expected a palette ('P') or "
                "greyscale ('L') PNG whose pixel values are class indices")
    if check.label and check.num_classes is not None:
        bad = [v for v in info["values"] if v >= check.num_classes and v != check.void]
        if bad:
            return (f"{path} (from {check.where}): label values {bad} are outside [0, {check.num_classes}) and not "
                    f"the void value {check.void}; check model.num_classes / data.class_names against the masks")
    expected = check.size or size_of.get(check.same_size_as)
    if expected is not None and tuple(info["size"]) != tuple(expected):
        where = check.where if check.size else f"its mask {check.same_size_as}"
        return size_mismatch(path, tuple(info["size"]), tuple(expected), where)
    return None


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    """Atomic (temp file + rename), so concurrent runs never read half a file; a read-only home just
    means no cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(cache, f)
        os.replace(f.name, path)
    except OSError as error:
        logger.warning("cannot write the validation cache %s: %s", path, error)
