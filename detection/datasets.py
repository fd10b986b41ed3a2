"""COCO and PASCAL VOC annotations as one record type, validated when loaded, held as flat arrays.

Loading checks everything that can be checked without decoding images (types of ids and boxes, files exist
inside the image folder, boxes inside the image, known classes), so a bad annotation fails at start-up naming
its file and object, not mid-epoch as a NaN loss; `validate_records` then checks the images as `data.validate`
says (datafiles.validation) and `DetectionDataset` handles one that fails later as `data.skip_invalid` says.
Boxes are float32 xyxy pixels with x2/y2 exclusive (COCO's x + w); labels are contiguous 1..K, 0 = background.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import operator
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datafiles.images import DatasetError, image_to_tensor, inside, read_image, size_mismatch  # noqa: F401 (re-exported: part of this module's API)
from datafiles.validation import FileCheck, InvalidFiles, file_problem, validate_files, validation_mode

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
BOX_TOLERANCE = 1.0  # pixels a box may overhang the image (annotation round-off); it is clipped back


@dataclass
class ImageRecord:
    path: str
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy pixels, x2/y2 exclusive
    labels: np.ndarray  # int64 [N], 1..K
    ignore: np.ndarray  # bool [N]: COCO iscrowd / VOC difficult
    image_id: int


class ImageRecords(Sequence[ImageRecord]):
    """Many ImageRecords held as a few flat, read-only numpy arrays: the paths as one UTF-8 buffer, the boxes,
    labels and ignore flags of all images concatenated, each with offsets (Detectron2's NumpySerializedList,
    by column). Reading a record touches no Python object of the store, so DataLoader workers forked from the
    process that loaded it share its pages without copying them (reference counts of per-record objects would
    copy them page by page), and a COCO-size split holds ~30 MB instead of ~300 MB of objects. Records come out
    as ImageRecords whose arrays are read-only views."""

    def __init__(self, paths: np.ndarray, path_offsets: np.ndarray, sizes: np.ndarray, image_ids: np.ndarray,
                 boxes: np.ndarray, labels: np.ndarray, ignore: np.ndarray, object_offsets: np.ndarray) -> None:
        self._paths, self._path_offsets = paths, path_offsets  # uint8 UTF-8 bytes; int64 [N + 1]
        self._sizes, self._image_ids = sizes, image_ids  # int64 [N, 2] (width, height); int64 [N]
        self._boxes, self._labels, self._ignore = boxes, labels, ignore  # [M, 4] float32, [M] int64, [M] bool
        self._object_offsets = object_offsets  # int64 [N + 1]
        for array in (paths, path_offsets, sizes, image_ids, boxes, labels, ignore, object_offsets):
            array.flags.writeable = False

    @classmethod
    def from_records(cls, records: Iterable[ImageRecord]) -> ImageRecords:
        if isinstance(records, ImageRecords):
            return records
        records = list(records)
        return cls.from_columns([r.path for r in records], [(r.width, r.height) for r in records],
                                [r.image_id for r in records],
                                np.concatenate([np.zeros((0, 4), np.float32), *(r.boxes for r in records)]),
                                np.concatenate([np.zeros(0, np.int64), *(r.labels for r in records)]),
                                np.concatenate([np.zeros(0, bool), *(r.ignore for r in records)]),
                                [len(r.labels) for r in records])

    @classmethod
    def from_columns(cls, paths: Sequence[str], sizes: Sequence | np.ndarray, image_ids: Sequence[int] | np.ndarray,
                     boxes: np.ndarray, labels: np.ndarray, ignore: np.ndarray,
                     counts: Sequence[int] | np.ndarray) -> ImageRecords:
        """The store of images given column by column, their objects concatenated in image order (`counts` per
        image)."""
        encoded = [path.encode() for path in paths]
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), _offsets([len(e) for e in encoded]),
                   np.asarray(sizes, dtype=np.int64).reshape(-1, 2), np.asarray(image_ids, dtype=np.int64),
                   np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
                   np.asarray(ignore, dtype=bool), _offsets(counts))

    def __len__(self) -> int:
        return len(self._image_ids)

    def __getitem__(self, index: int | slice) -> ImageRecord | ImageRecords:
        if isinstance(index, slice):
            return self.select(np.arange(len(self))[index])
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        start, end = self._object_offsets[index], self._object_offsets[index + 1]
        path = self._paths[self._path_offsets[index]:self._path_offsets[index + 1]].tobytes().decode()
        width, height = self._sizes[index].tolist()
        return ImageRecord(path=path, width=width, height=height, boxes=self._boxes[start:end],
                           labels=self._labels[start:end], ignore=self._ignore[start:end],
                           image_id=int(self._image_ids[index]))

    def select(self, indices: Sequence[int] | np.ndarray) -> ImageRecords:
        """The records at `indices`, in that order, as a new store."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        paths, path_offsets = _gather(self._paths, self._path_offsets, indices)
        objects, object_offsets = _gather(np.arange(len(self._labels)), self._object_offsets, indices)
        return ImageRecords(paths, path_offsets, self._sizes[indices], self._image_ids[indices], self._boxes[objects],
                            self._labels[objects], self._ignore[objects], object_offsets)

    def files(self) -> Iterator[tuple[str, int, int, int]]:
        """(path, width, height, image id) of each record, without building the records."""
        paths, offsets = self._paths.tobytes(), self._path_offsets.tolist()
        for index, ((width, height), image_id) in enumerate(zip(self._sizes.tolist(), self._image_ids.tolist())):
            yield paths[offsets[index]:offsets[index + 1]].decode(), width, height, image_id

    def aspect_ratios(self) -> np.ndarray:
        """Width / height per record (float64)."""
        return self._sizes[:, 0] / self._sizes[:, 1]

    def objects(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every object of the store in record order: its record's index, its box and its label (read-only)."""
        counts = np.diff(self._object_offsets)
        return np.repeat(np.arange(len(self)), counts), self._boxes, self._labels

    def keep_objects(self, keep: np.ndarray) -> ImageRecords:
        """The same images with only the objects where `keep` (a mask over `objects()`) is true."""
        kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        return ImageRecords(self._paths, self._path_offsets, self._sizes, self._image_ids, self._boxes[keep],
                            self._labels[keep], self._ignore[keep], kept_before[self._object_offsets])

    def count_objects(self) -> tuple[int, int]:
        """(objects, objects that are training targets: not crowd / difficult)."""
        return len(self._ignore), int((~self._ignore).sum())

    def __repr__(self) -> str:
        return f"ImageRecords({len(self)} images, {len(self._labels)} objects)"


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _gather(values: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs `values[offsets[i]:offsets[i + 1]]` for i in `indices`, concatenated, and their new offsets."""
    lengths = offsets[indices + 1] - offsets[indices]
    new_offsets = _offsets(lengths)
    positions = np.repeat(offsets[indices] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return values[positions], new_offsets


class _Problems:
    """Raise on the first bad item, or with skip_invalid log it, count it, and summarise once at the end."""

    def __init__(self, source: Path, skip_invalid: bool):
        self.source, self.skip_invalid, self.count = source, skip_invalid, 0

    def __call__(self, message: str) -> None:
        if not self.skip_invalid:
            raise DatasetError(message)
        logger.warning("skipped: %s", message)
        self.count += 1

    def summarize(self) -> None:
        if self.count:
            logger.warning("%s: skipped %d invalid item(s) (skip_invalid=True)", self.source, self.count)


def _checked_boxes(xyxy: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Boxes (float64 [N, 4] xyxy) clipped to their images if they overhang by at most BOX_TOLERANCE, as float32,
    and per box "" or why it is refused. Zero width or height passes: data.min_box_size drops (train) or names
    (val) such a box."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    limits = np.stack([widths, heights, widths, heights], axis=1).astype(np.float64)
    finite = np.isfinite(xyxy).all(axis=1)
    outside = finite & ((xyxy[:, :2] < -BOX_TOLERANCE).any(axis=1)
                        | (xyxy[:, 2:] > limits[:, 2:] + BOX_TOLERANCE).any(axis=1))
    with np.errstate(invalid="ignore"):
        clipped = np.clip(xyxy, 0, limits)
    negative = finite & ~outside & ((clipped[:, 2] < clipped[:, 0]) | (clipped[:, 3] < clipped[:, 1]))
    why = [""] * len(xyxy)
    for index in np.flatnonzero(~finite | outside | negative):
        why[index] = ("is not 4 finite numbers" if not finite[index] else
                      f"lies outside the {widths[index]}x{heights[index]} image" if outside[index] else
                      "has negative width or height")
    return clipped.astype(np.float32), why


def _checked_box(box: Sequence[float], width: int, height: int) -> tuple[np.ndarray | None, str]:
    """One box through `_checked_boxes`: (the clipped float32 box, "") or (None, why)."""
    boxes, (why,) = _checked_boxes(np.array([box], dtype=np.float64), np.array([width]), np.array([height]))
    return (None if why else boxes[0]), why


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) by decoding: only for annotations that do not record the size."""
    height, width = read_image(path).shape[:2]
    return width, height


def _record(path: Path, width: int, height: int, boxes: list, labels: list, ignore: list, image_id: int) -> ImageRecord:
    return ImageRecord(path=str(path), width=int(width), height=int(height),
                       boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                       labels=np.asarray(labels, dtype=np.int64), ignore=np.asarray(ignore, dtype=bool),
                       image_id=int(image_id))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_POLYGONS = re.compile(rb'"segmentation"\s*:\s*\[\s*(?:\[[-+0-9.eE,\s]*\]\s*,?\s*)*\]')
"""A "segmentation" key with its polygon list (lists of numbers only: the match cannot run past the value)."""


def _read_coco_json(annotations_json: Path) -> dict:
    """The json without its polygons (each becomes []): detection uses none of them, and they are most of COCO's
    file: parsing them into Python floats took 4.6x the time (151 s vs 33 s on a busy 2-core box) and 3x the peak
    memory (2.7 vs 0.9 GiB) for COCO 2017's train json. A file the cut text does not parse is parsed whole, for
    the error at its place in the file."""
    try:
        text = _without_polygons(annotations_json)
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            del text
            data = json.loads(annotations_json.read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{annotations_json}: cannot read COCO json: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DatasetError(f"{annotations_json}: not COCO instances json (needs 'images' and 'categories' lists)")
    return data


def _without_polygons(path: Path, block: int = 1 << 25) -> bytes:
    """The file's text with every polygon list cut, read in blocks so that the whole file is never in memory.
    A block is cut up to its last "segmentation" key: a polygon match cannot run over a key (its characters are
    number characters only), so each one lies whole in the text cut before it; the rest goes to the next block."""
    parts, rest = [], b""
    with open(path, "rb") as f:
        while data := f.read(block):
            text = rest + data
            cut = max(text.rfind(b'"segmentation"'), 0)
            parts.append(_POLYGONS.sub(b'"segmentation":[]', text[:cut]))
            rest = text[cut:]
    parts.append(_POLYGONS.sub(b'"segmentation":[]', rest))
    return b"".join(parts)


class _ExistingFiles:
    """Whether files exist, from one listing per folder: a stat per file took seconds for COCO's 118k images."""

    def __init__(self) -> None:
        self._listings: dict[str, set[str]] = {}

    def __contains__(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._listings:
            try:
                with os.scandir(folder or ".") as entries:
                    self._listings[folder] = {entry.name for entry in entries if entry.is_file()}
            except OSError:
                self._listings[folder] = set()
        return name in self._listings[folder]


def _coco_image_files(images_dir: Path, images: list[dict], annotations_json: Path
                      ) -> tuple[list[str], np.ndarray, dict[int, tuple[str, bool]]]:
    """Per image: its file's path, its (width, height) and, for an unusable one, (why, whether that is fatal even
    with skip_invalid: a name that climbs out of the image folder)."""
    prefix = str(images_dir / "_")[:-1]  # what `images_dir / name` puts before a plain file name
    existing = _ExistingFiles()
    paths, sizes, problems = [""] * len(images), np.zeros((len(images), 2), dtype=np.int64), {}
    for index, img in enumerate(images):
        image_id, name = img["id"], img.get("file_name")
        if not isinstance(name, str) or not name:
            problems[index] = (f"{annotations_json}: image id {image_id}: 'file_name' {name!r} is not a file name",
                               False)
            continue
        plain = os.sep not in name and (os.altsep is None or os.altsep not in name) and name not in (".", "..")
        try:
            path = prefix + name if plain else str(inside(images_dir, name, f"{annotations_json}: image id {image_id}"))
        except DatasetError as error:
            problems[index] = (str(error), True)
            continue
        width, height = img.get("width"), img.get("height")
        if any(v is not None and not (_is_int(v) and v > 0) for v in (width, height)):
            problems[index] = (f"{annotations_json}: image id {image_id} ({name}): width {width!r} / height {height!r} "
                               "must be positive integers (or absent: then read from the file)", False)
            continue
        if path not in existing:
            problems[index] = (f"{annotations_json}: image id {image_id}: file {path} does not exist", False)
            continue
        paths[index], sizes[index] = path, (width, height) if width and height else _image_size(Path(path))
    return paths, sizes, problems


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float64: not a finite number
        return math.inf if value > 0 else -math.inf


def _xywh(bboxes: list) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [N, 4], per bbox whether it is a list of 4 numbers): one numpy conversion when all are, as in any
    valid file; bbox by bbox otherwise."""
    if (all(type(b) is list and len(b) == 4 for b in bboxes)
            and {type(v) for b in bboxes for v in b} <= {int, float}):
        try:
            return np.array(bboxes, dtype=np.float64).reshape(-1, 4), np.ones(len(bboxes), dtype=bool)
        except OverflowError:
            pass
    numbers = np.fromiter((type(b) is list and len(b) == 4 and all(map(_is_number, b)) for b in bboxes), bool,
                          len(bboxes))
    values = [[_as_float(v) for v in b] if ok else [0.0] * 4 for b, ok in zip(bboxes, numbers)]
    return np.array(values, dtype=np.float64).reshape(-1, 4), numbers


def _coco_objects(anns: list[dict], owner: np.ndarray, paths: list[str], sizes: np.ndarray,
                  label_of: dict[int, int], annotations_json: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Boxes (float32 xyxy, clipped), labels and crowd flags of all annotations at once (`owner`: each one's image
    index), and {annotation index: why it is unusable} checked in this order: category, bbox type, iscrowd,
    geometry."""
    categories = [ann.get("category_id") for ann in anns]
    labels = np.fromiter((label_of.get(c, 0) if _is_int(c) else 0 for c in categories), np.int64, len(anns))
    bboxes = [ann.get("bbox") for ann in anns]
    xywh, numbers = _xywh(bboxes)
    crowds = [ann.get("iscrowd", 0) for ann in anns]
    crowd_ok = np.fromiter((c in (0, 1) and not isinstance(c, float) for c in crowds), bool, len(anns))
    boxes, geometry = _checked_boxes(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                                     sizes[owner, 0], sizes[owner, 1])
    problems = {}
    bad_geometry = np.fromiter(map(bool, geometry), bool, len(geometry))
    for index in np.flatnonzero((labels == 0) | ~numbers | ~crowd_ok | bad_geometry):
        where = (f"{annotations_json}: annotation id {anns[index].get('id')} "
                 f"(image {os.path.basename(paths[owner[index]])})")
        if labels[index] == 0:
            problems[index] = f"{where}: category_id {categories[index]!r} is not in 'categories'"
        elif not numbers[index]:
            problems[index] = f"{where}: bbox {bboxes[index]!r} must be a list of 4 numbers [x, y, width, height]"
        elif not crowd_ok[index]:
            problems[index] = f"{where}: iscrowd {crowds[index]!r} must be 0 or 1"
        else:
            problems[index] = f"{where}: bbox {bboxes[index]} (xywh) {geometry[index]}"
    return boxes, labels, np.array([bool(c) for c in crowds], dtype=bool), problems


def load_coco_records(images_dir: str | Path, annotations_json: str | Path, *,
                      skip_invalid: bool = False) -> tuple[ImageRecords, list[str], list[int]]:
    """Records, class names and COCO category ids; label k is category `cat_ids[k - 1]` (sorted by id).
    Images without annotations are kept: they are valid negatives. Problems are reported in file order (an image,
    then its annotations), the first one raising unless `skip_invalid`.

    Python's cyclic garbage collector is paused meanwhile: the json of COCO's size is millions of dicts and
    lists and no cycle, and collections triggered by their allocation would traverse them all again and again
    (a third of the loading time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_coco_records(Path(images_dir), Path(annotations_json), skip_invalid)
    finally:
        if enabled:
            gc.enable()


def _load_coco_records(images_dir: Path, annotations_json: Path,
                       skip_invalid: bool) -> tuple[ImageRecords, list[str], list[int]]:
    data = _read_coco_json(annotations_json)
    for kind in ("categories", "images"):
        for entry in data[kind]:
            if not isinstance(entry, dict) or not _is_int(entry.get("id")):
                raise DatasetError(f"{annotations_json}: {kind} entry {str(entry)[:80]}: 'id' must be an integer")
        ids = [entry["id"] for entry in data[kind]]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise DatasetError(f"{annotations_json}: {kind} id {duplicate} appears more than once; ids must be unique")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in categories]
    class_names = [str(c.get("name", c["id"])) for c in categories]
    images = data["images"]
    position = {img["id"]: index for index, img in enumerate(images)}
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{annotations_json}: 'annotations' must be a list")
    problem = _Problems(annotations_json, skip_invalid)
    anns, owner = [], []
    for ann in data.get("annotations", []):
        if not isinstance(ann, dict):
            problem(f"{annotations_json}: annotation {str(ann)[:80]} is not a mapping")
        elif _is_int(ann.get("image_id")) and ann["image_id"] in position:
            anns.append(ann)
            owner.append(position[ann["image_id"]])
        else:
            problem(f"{annotations_json}: annotation id {ann.get('id')} refers to unknown image_id "
                    f"{ann.get('image_id')}")
    del data
    owner = np.asarray(owner, dtype=np.int64)
    paths, sizes, image_problems = _coco_image_files(images_dir, images, annotations_json)
    boxes, labels, crowd, object_problems = _coco_objects(anns, owner, paths, sizes,
                                                          {cat_id: k for k, cat_id in enumerate(cat_ids, start=1)},
                                                          annotations_json)
    in_file_order = sorted([(index, -1, why) for index, why in image_problems.items()]
                           + [(owner[k], k, (why, False)) for k, why in object_problems.items()
                              if owner[k] not in image_problems])
    for _, _, (why, fatal) in in_file_order:
        if fatal:
            raise DatasetError(why)
        problem(why)
    problem.summarize()

    usable = np.array([index not in image_problems for index in range(len(images))], dtype=bool)
    keep = usable[owner] & ~np.isin(np.arange(len(anns)), list(object_problems))
    record_of = np.cumsum(usable) - 1  # image index -> record index
    order = np.argsort(owner[keep], kind="stable")  # the objects grouped by image, in file order within each
    kept_images = np.flatnonzero(usable)
    records = ImageRecords.from_columns(
        [paths[i] for i in kept_images], sizes[kept_images], np.array([images[i]["id"] for i in kept_images]),
        boxes[keep][order], labels[keep][order], crowd[keep][order],
        np.bincount(record_of[owner[keep]], minlength=len(kept_images)))
    return records, class_names, cat_ids


def _voc_image(root: Path, name: str, image_id: int, class_names: Sequence[str],
               problem: _Problems) -> ImageRecord | None:
    """One VOC image's record, or None when the image itself is unusable (and skip_invalid is on)."""
    xml_path = inside(root / "Annotations", f"{name}.xml", f"{root}: split list entry {name!r}")
    path = root / "JPEGImages" / f"{name}.jpg"
    if not path.is_file():
        problem(f"{xml_path}: image file {path} does not exist")
        return None
    try:
        tree = ET.parse(xml_path)
    except (OSError, ET.ParseError) as e:
        problem(f"{xml_path}: cannot parse VOC XML: {e}")
        return None
    size = tree.find("size")
    try:
        width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    except (AttributeError, TypeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:
        width, height = _image_size(path)

    label_of = {n: k for k, n in enumerate(class_names, start=1)}
    boxes, labels, ignore = [], [], []
    for index, obj in enumerate(tree.findall("object")):
        cls = (obj.findtext("name") or "").strip()
        where = f"{xml_path}: object {index} ({cls!r})"
        if cls not in label_of:
            problem(f"{where}: unknown class name, expected one of {list(class_names)}")
            continue
        bndbox = obj.find("bndbox")
        try:  # VOC is 1-based inclusive: 0-based exclusive is (x1 - 1, y1 - 1, x2, y2)
            x1, y1, x2, y2 = (float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            problem(f"{where}: missing or non-numeric <bndbox>")
            continue
        box, why = _checked_box([x1 - 1, y1 - 1, x2, y2], width, height)
        if box is None:
            problem(f"{where}: bndbox {[x1, y1, x2, y2]} (1-based inclusive) {why}")
            continue
        boxes.append(box)
        labels.append(label_of[cls])
        ignore.append((obj.findtext("difficult") or "0").strip() == "1")
    return _record(path, width, height, boxes, labels, ignore, image_id)


def load_voc_records(root: str | Path, split: str, *, class_names: Sequence[str] = VOC_CLASSES,
                     skip_invalid: bool = False) -> ImageRecords:
    """Records of `root/ImageSets/Main/<split>.txt` for a VOC20xx folder; image_id = index in the split list;
    `difficult` objects are kept with ignore=True."""
    root = Path(root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        names = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DatasetError(f"{split_file}: cannot read VOC split list: {e}") from e
    problem = _Problems(split_file, skip_invalid)
    records = [_voc_image(root, name, image_id, class_names, problem) for image_id, name in enumerate(names)]
    problem.summarize()
    return ImageRecords.from_records(r for r in records if r is not None)


def validate_records(records: Sequence[ImageRecord], *, split: str = "train", validate: str | bool = "auto",
                     skip_invalid: bool = False, report_dir: str | Path | None = None, num_workers: int | None = None,
                     cache_dir: str | Path | None = None) -> ImageRecords:
    """Check the images as `validate` (`data.validate`: auto | full | header | false) says (datafiles.validation:
    full decodes are parallel, sharded over ranks and cached outside the data folder; call it on every rank) and
    return the usable records. A split with no object to learn from (no annotations, or crowd / difficult ones
    only) is refused. With `skip_invalid` bad images are skipped, counted and listed in
    `report_dir/invalid_<split>.txt`; without it the first one raises DatasetError."""
    records = ImageRecords.from_records(records)
    mode = validation_mode(validate, len(records))
    kept = records
    if mode is not None:
        checks = [_file_check(*file) for file in records.files()]
        skipped, _ = validate_files(checks, skip_invalid=skip_invalid, report_dir=report_dir, split=split, mode=mode,
                                    num_workers=num_workers, cache_dir=cache_dir)
        kept = records.select([index for index in range(len(records)) if index not in skipped])
    objects, usable = kept.count_objects()
    if usable == 0:
        folder = Path(records[0].path).parent if len(records) else "(no images)"
        raise DatasetError(f"{split} split ({folder}): {len(kept)} usable image(s) with {objects} object(s), none "
                           "usable as a training target (crowd / difficult only, or no annotations): nothing to "
                           "learn from; check the annotation file or split list")
    return kept


def _file_check(path: str, width: int, height: int, image_id: int) -> FileCheck:
    return FileCheck(Path(path), where=f"the annotation of image id {image_id}", size=(width, height))


class DetectionDataset(Dataset):
    """(image [3, H, W] float32 RGB in [0, 1], target) pairs. Targets hold only non-ignored boxes: crowd /
    difficult objects are not training targets; evaluators read them from the records.

    An image that fails to decode (or has another size than annotated) raises DatasetError naming it, unless
    `invalid` skips it (`data.skip_invalid`, datafiles.validation.InvalidFiles: logged and listed). Training
    (`replace_skipped`) then takes the next usable image of the dataset in its place, so a batch keeps its size
    and the substitute depends on the index alone: the same for any num_workers, resumed or not; evaluation
    gets None, which `collate` drops (the image counts as one without detections)."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable | None = None, *,
                 invalid: InvalidFiles | None = None, replace_skipped: bool = True):
        self.records = ImageRecords.from_records(records)
        self.transform = transform
        self.invalid, self.replace_skipped = invalid, replace_skipped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict] | None:
        for offset in range(len(self)):
            try:
                return self._sample((index + offset) % len(self))
            except DatasetError as error:
                if self.invalid is None:
                    raise
                self.invalid.met(error)  # raises unless data.skip_invalid
                if not self.replace_skipped:
                    return None
        raise DatasetError(f"none of the {len(self)} images of {Path(self.records[0].path).parent} can be decoded")

    def _sample(self, index: int) -> tuple[torch.Tensor, dict]:
        record = self.records[index]
        try:
            image = read_image(record.path)
        except DatasetError:
            # the message the up-front check gives for this file
            check = _file_check(record.path, record.width, record.height, record.image_id)
            raise DatasetError(file_problem(check) or f"{record.path} (from {check.where}): OpenCV cannot decode "
                               "it (PIL can): re-save it as a plain JPEG or PNG, or remove it from the annotations")
        if image.shape[:2] != (record.height, record.width):
            raise DatasetError(size_mismatch(record.path, (image.shape[1], image.shape[0]), (record.width, record.height),
                                             f"the annotation of image id {record.image_id}"))
        keep = ~record.ignore
        boxes, labels = record.boxes[keep], record.labels[keep]
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64)
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                  "image_id": record.image_id, "orig_size": (record.height, record.width)}
        return image_to_tensor(image), target

    def aspect_ratios(self) -> list[float]:
        """Width / height per record, from the annotations (no decoding), for aspect-ratio grouping."""
        return self.records.aspect_ratios().tolist()


def collate(batch: Sequence[tuple[torch.Tensor, dict] | None]) -> tuple[list[torch.Tensor], list[dict]]:
    """Images differ in size, so a batch stays a list; the model pads them itself. Skipped images (None) are
    left out."""
    batch = [sample for sample in batch if sample is not None]
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
