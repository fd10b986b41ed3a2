"""Check a split's images (and label PNGs) before the first iteration, as `data.validate` says, and handle the
files that turn out bad later, mid-run, as `data.skip_invalid` says.

`data.validate` (one key for train_det, train_seg and train_cls):

- ``full``: decode every file once (PIL, strict: it raises on truncated data). Sharded over the ranks and, in
  each, over a thread pool (the decoders release the GIL); every result is cached by path + size + mtime in
  ``$RESDET_CACHE`` or ``~/.cache/resdet`` (never in the data folder), written as it goes, so an interrupted check
  resumes where it stopped and a second run decodes nothing.
- ``header``: read each file's header only (format, size, mode; ~40 us a file): the file exists, is an image the
  training reader opens, and has the annotated size. A file whose body is corrupt is met when a worker decodes it.
- ``false`` (YAML reads ``off`` as false): no check up front beyond what loading the annotations does.
- ``auto`` (the default): ``full`` for a split of at most FULL_DECODE_LIMIT files, ``header`` above (decoding
  COCO's 118k images took 451 s of a 529 s start on a 2-core box).

A bad file found up front stops the run naming itself, or with ``data.skip_invalid=true`` is skipped, counted and
listed in ``output_dir/invalid_<split>.txt``. One met mid-run (`InvalidFiles`) does the same: the run stops with
the file's own message (also from a DataLoader worker), or it is skipped, logged and added to that list, which
every rank and worker shares (kept sorted, each file once, under a file lock), so a run lists the same files for
any num_workers, and a resumed run the same as an uninterrupted one.

Under DDP every rank checks its share (every world_size-th file) and the results are all-gathered, so all ranks
work at once and agree on what is skipped: call it on every rank, outside `main_process_first`.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from struct import error as struct_error

import numpy as np
from PIL import Image
from tqdm import tqdm

from engine.distributed import all_gather_object, get_rank, get_world_size, is_main_process
from .images import DatasetError, read_header, size_mismatch

logger = logging.getLogger(__name__)

VALIDATE_CHOICES = ("auto", "full", "header", False)
FULL_DECODE_LIMIT = 10_000
"""`data.validate=auto` decodes a split of up to this many files in full (~40 s at PIL's ~260 images/s on a
2-core box, once: then cached), and checks headers only above it."""
CACHE_FOLDER = "validated"
CACHE_FLUSH_EVERY = 512
"""Decoded files between two appends to this process's cache file: what an interrupted check redoes at most."""
CHUNK = 64
"""Files per task of the thread pool (one task per file would cost more in futures than a header read)."""
OPENCV_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}
"""PIL format names of files OpenCV's `imread` also decodes (the detection / segmentation reader)."""


@dataclass(frozen=True)
class FileCheck:
    """One file to check: `size` is the (width, height) the annotation expects (None: any), or
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


def validation_mode(validate: str | bool, num_files: int) -> str | None:
    """`data.validate` for a split of `num_files` files: "full", "header" or None (no check)."""
    if validate not in VALIDATE_CHOICES:
        raise ValueError(f"data.validate={validate!r} is not one of auto, full, header, false (off)")
    if validate == "auto":
        return "full" if num_files <= FULL_DECODE_LIMIT else "header"
    return validate or None


def validate_files(checks: Sequence[FileCheck], *, skip_invalid: bool, report_dir: str | Path | None = None,
                   split: str = "data", mode: str = "full", num_workers: int | None = None,
                   cache_dir: str | Path | None = None) -> tuple[set[int], dict[int, dict]]:
    """Check every file (`mode` "full": decode, "header": read the header); returns (indices of skipped checks,
    what was read per check index: `size` [w, h], `format`, `mode` and, for label PNGs decoded in full, `values`
    (the sorted label values present)).

    Without `skip_invalid` the first bad file (in `checks` order) raises DatasetError naming it, its problem and
    what to do; with it every bad file is logged, counted, and listed in `report_dir/invalid_<split>.txt`.
    Collective under DDP: every rank must call it with the same checks.
    """
    rank, world_size = get_rank(), get_world_size()
    mine = list(range(rank, len(checks), world_size))
    inspect = _inspect if mode == "full" else _inspect_header
    found = (_decode_cached(checks, mine, split, num_workers, cache_dir) if mode == "full"
             else _run_all(lambda i: inspect(checks[i]), mine, split, num_workers))
    info: dict[int, dict] = {}
    for part in all_gather_object(found):
        info.update(part)

    size_of = {checks[i].path: tuple(found["size"]) for i, found in info.items() if "error" not in found}
    skipped: dict[int, str] = {}
    for index, check in enumerate(checks):
        problem = _problem(check, info[index], size_of)
        if problem is None:
            continue
        if not skip_invalid:
            raise DatasetError(f"{problem} (or set data.skip_invalid=true to skip such files)")
        logger.warning("skipped: %s", problem)
        skipped[index] = problem
    if skipped:
        logger.warning("%s: skipped %d of %d file(s) (data.skip_invalid=true)%s", split, len(skipped), len(checks),
                       f"; list in {Path(report_dir) / f'invalid_{split}.txt'}" if report_dir else "")
        if report_dir is not None and is_main_process():
            add_to_report(Path(report_dir) / f"invalid_{split}.txt", skipped.values())
    return set(skipped), {i: found for i, found in info.items() if "error" not in found}


def file_problem(check: FileCheck) -> str | None:
    """Why `check.path` is unusable after decoding it in full, or None: the message the up-front check gives."""
    return _problem(check, _inspect(check), {})


def add_to_report(path: Path, problems: Sequence[str] | set[str]) -> None:
    """Merge `problems` into the list at `path` (sorted, each once) under an exclusive lock on the file, so every
    rank and DataLoader worker may add to it at any time and the list is the same whoever met a file first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        listed = set(f.read().splitlines())
        merged = listed | set(problems)
        if merged != listed:
            f.truncate(0)
            f.write("".join(f"{line}\n" for line in sorted(merged)))


class InvalidFiles:
    """What a dataset does with a file that fails mid-run (a check it passed, or one that was not made): without
    `skip` re-raise its DatasetError (the run stops naming the file; torch re-raises a worker's DatasetError
    with the same message), with it log it once per process, add it to `report` and let the dataset skip it."""

    def __init__(self, skip: bool, report: str | Path | None = None) -> None:
        self.skip, self.report = skip, Path(report) if report is not None else None
        self.seen: set[str] = set()

    def met(self, error: DatasetError) -> None:
        """Raise `error`, or record it (returning: the caller skips the file)."""
        if not self.skip:
            raise DatasetError(f"{error} (or set data.skip_invalid=true to skip such files)") from None
        message = str(error)
        if message in self.seen:
            return
        self.seen.add(message)
        logger.warning("skipped mid-run (data.skip_invalid=true): %s%s", message,
                       f"; listed in {self.report}" if self.report else "")
        if self.report is not None:
            add_to_report(self.report, [message])


# ------------------------------------------------------------------ reading the files

def _run_all(inspect: Callable[[int], dict], indices: list[int], split: str, num_workers: int | None,
             on_result: Callable[[int, dict], None] | None = None) -> dict[int, dict]:
    """`inspect` of every index on a thread pool (file reads and decoders release the GIL), in chunks, with a
    progress bar on rank 0; `on_result(index, found)` as each completes, in order."""
    workers = max(1, num_workers or len(os.sched_getaffinity(0)))
    chunks = [indices[start:start + CHUNK] for start in range(0, len(indices), CHUNK)]
    results: dict[int, dict] = {}
    pool = ThreadPoolExecutor(workers)
    try:
        with tqdm(total=len(indices), unit="file", desc=f"checking {split} files", mininterval=2,
                  disable=not indices or not is_main_process()) as bar:
            for chunk, found in zip(chunks, pool.map(lambda chunk: [inspect(i) for i in chunk], chunks)):
                for index, result in zip(chunk, found):
                    results[index] = result
                    if on_result is not None:
                        on_result(index, result)
                bar.update(len(chunk))
    finally:
        pool.shutdown(cancel_futures=True)  # interrupted (Ctrl-C, a signal): start no further chunk
    return results


def _decode_cached(checks: Sequence[FileCheck], indices: list[int], split: str, num_workers: int | None,
                   cache_dir: str | Path | None) -> dict[int, dict]:
    """Full decodes of `indices`, from the cache where a file's size and mtime are unchanged; new results are
    appended to this process's own cache file every CACHE_FLUSH_EVERY files (failures are not cached:
    re-decoding a bad file is cheap and keeps its message exact)."""
    folder = Path(cache_dir or default_cache_dir()) / CACHE_FOLDER
    cache = _read_cache(folder)
    found: dict[int, dict] = {}
    todo = []
    stamps = {index: _stamp(checks[index]) for index in indices}
    for index in indices:
        hit = cache.get(_key(checks[index]))
        if stamps[index] is not None and hit is not None and hit[0] == stamps[index]:
            found[index] = hit[1]
        else:
            todo.append(index)
    writer = _CacheWriter(folder)

    def record(index: int, result: dict) -> None:
        if "error" not in result and stamps[index] is not None:
            writer.add(_key(checks[index]), [stamps[index], result])

    try:
        found.update(_run_all(lambda i: _inspect(checks[i]), todo, split, num_workers, on_result=record))
    finally:
        writer.flush()  # also when interrupted: the next check starts after what was done
    return found


def _inspect(check: FileCheck) -> dict:
    """Decode one file fully: {"size", "format", "mode"[, "values"]} or {"error": why}."""
    try:
        with Image.open(check.path) as image:
            image.load()  # raises on truncated data
            info = {"size": list(image.size), "format": image.format, "mode": image.mode}
            if check.label and image.mode in ("P", "L"):
                info["values"] = np.unique(np.asarray(image)).tolist()
        return info
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def _inspect_header(check: FileCheck) -> dict:
    """The header of one file: {"size", "format", "mode"} or {"error": why}."""
    try:
        return read_header(check.path)
    except (OSError, SyntaxError, ValueError, struct_error) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def _problem(check: FileCheck, info: dict, size_of: dict[Path, tuple[int, int]]) -> str | None:
    """Why `check.path` is unusable, or None. Every message names the file and what to do."""
    path = check.path
    if "error" in info:
        if not Path(path).is_file():
            return f"{path} (from {check.where}): file does not exist"
        if os.path.getsize(path) == 0:
            return f"{path} (from {check.where}): file is empty (0 bytes); re-copy or re-download it"
        return (f"{path} (from {check.where}): cannot decode ({info['error']}): the file is truncated, corrupt or "
                "not an image; re-copy or re-download it, or remove it from the annotations")
    if check.opencv and not check.label and info["format"] not in OPENCV_FORMATS:
        return (f"{path} (from {check.where}): {info['format']} images are not read by the training reader "
                f"(OpenCV); convert it to JPEG or PNG")
    if check.label and info["mode"] not in ("P", "L"):
        return (f"{path} (from {check.where}): label file has mode {info['mode']!r}; expected a palette ('P') or "
                "greyscale ('L') PNG whose pixel values are class indices")
    if check.label and check.num_classes is not None and "values" in info:
        bad = [v for v in info["values"] if v >= check.num_classes and v != check.void]
        if bad:
            return (f"{path} (from {check.where}): label values {bad} are outside [0, {check.num_classes}) and not "
                    f"the void value {check.void}; check model.num_classes / data.class_names against the masks")
    expected = check.size or size_of.get(check.same_size_as)
    if expected is not None and tuple(info["size"]) != tuple(expected):
        where = check.where if check.size else f"its mask {check.same_size_as}"
        return size_mismatch(path, tuple(info["size"]), tuple(expected), where)
    return None


# ------------------------------------------------------------------ the cache of full decodes

def _key(check: FileCheck) -> str:
    return f"{'label' if check.label else 'image'}:{Path(check.path).absolute()}"


def _stamp(check: FileCheck) -> list[int] | None:
    try:
        stat = os.stat(check.path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _read_cache(folder: Path) -> dict[str, list]:
    """Every entry of every cache file in `folder` ({key: [stamp, info]}), later files winning; a line cut short
    by an interrupted write is ignored."""
    cache: dict[str, list] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                cache.update(json.loads(line))
            except ValueError:
                continue
    return cache


class _CacheWriter:
    """Appends results to a cache file of this process's own (no other process writes it, so nothing needs a
    lock), one JSON line per CACHE_FLUSH_EVERY results; a read-only home just means no cache."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"{time.time_ns()}-{socket.gethostname()}-{os.getpid()}.jsonl"  # sorted: oldest first
        self.pending: dict[str, list] = {}

    def add(self, key: str, entry: list) -> None:
        self.pending[key] = entry
        if len(self.pending) >= CACHE_FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(self.pending) + "\n")
        except OSError as error:
            logger.warning("cannot write the validation cache %s: %s", self.path, error)
        self.pending = {}
