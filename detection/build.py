"""From the `data` / `eval` sections of a detection config to records, datasets and evaluators.

Shared by tools/train_det.py, test_det.py and visualize_det.py so they read data the same way.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from datafiles.demo import prepare_demo_data
from datafiles.validation import InvalidFiles
from engine.config import CONFIGS_DIR

from .datasets import VOC_CLASSES, DetectionDataset, ImageRecord, ImageRecords, load_coco_records, load_voc_records
from .evaluation import CocoEvaluator, VOCEvaluator, records_to_coco
from .synthetic import generate_shapes_dataset
from .transforms import build_det_transforms

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = CONFIGS_DIR / "det" / "default.yaml"  # the detection schema: every det config overrides it
FORMATS = ("coco", "voc")
METRICS = ("coco", "voc07", "voc12")


def prepare_synthetic(data: Mapping[str, Any]) -> None:
    """The built-in demo data when the config turns it on (`data.synthetic.enabled: true`, see
    `datafiles.demo`): generated once into its own folder `data.root`."""
    spec = data["synthetic"]
    if spec["enabled"] is True:
        prepare_demo_data(data["root"], partial(generate_shapes_dataset, num_train=spec["num_train"],
                                                num_val=spec["num_val"], image_size=spec["image_size"]))


def load_split(data: Mapping[str, Any], split: str) -> tuple[list[ImageRecord], list[str], list[int] | None]:
    """Records, class names and (COCO) category ids of `data.train` or `data.val`, restricted to `data.classes`
    when set (see `select_classes`), then the first `data.<split>_limit` images when set; train boxes below
    `data.min_box_size` dropped (see `drop_small_boxes`)."""
    records, class_names, cat_ids = _load_all(data, split)
    if data["classes"]:
        records, class_names, cat_ids = select_classes(records, class_names, cat_ids, list(data["classes"]),
                                                       drop_empty=data["classes_drop_empty"])
    records = records[: data[f"{split}_limit"]]
    records, small = drop_small_boxes(records, data["min_box_size"], drop=split == "train")
    if small:
        what = "dropped before training" if split == "train" else "kept: the evaluation follows the annotations"
        below = (f"narrower or lower than data.min_box_size={data['min_box_size']:g} px" if data["min_box_size"] > 0
                 else "of zero width or height")
        logger.warning("%s split: %d box(es) %s, %s: %s", split, len(small), below, what,
                       "; ".join(f"{path} {class_names[label - 1]} {box}" for path, box, label in small))
    return records, class_names, cat_ids


def drop_small_boxes(records: Sequence[ImageRecord], min_size: float, *, drop: bool = True
                     ) -> tuple[ImageRecords, list[tuple[str, list[float], int]]]:
    """Records without the boxes whose width or height is below `min_size` pixels or zero (with `drop`; else
    unchanged), and every such box as (image path, [x1, y1, x2, y2], label). A degenerate annotation (BCCD's
    xmin == xmax, a COCO box of width 0) is no object to learn: Detectron2 and MMDetection filter them the same
    way before training. One vectorised pass over the store (COCO's 860k boxes in milliseconds)."""
    store = ImageRecords.from_records(records)
    image_index, boxes, labels = store.objects()
    sizes = boxes[:, 2:] - boxes[:, :2]
    tiny = ((sizes < min_size) | (sizes <= 0)).any(axis=1)
    small = [(store[int(i)].path, [round(float(v), 2) for v in box], int(label))
             for i, box, label in zip(image_index[tiny], boxes[tiny], labels[tiny])]
    return (store.keep_objects(~tiny) if drop and tiny.any() else store), small


def select_classes(records: list[ImageRecord], class_names: list[str], cat_ids: list[int] | None,
                   classes: Sequence[str], *, drop_empty: bool = False
                   ) -> tuple[list[ImageRecord], list[str], list[int] | None]:
    """Keep only objects of `classes`, relabelled 1..K in the given order; other objects are dropped (crowd /
    difficult ones of a kept class stay, still ignored). Images left without objects stay as negatives unless
    `drop_empty`. COCO category ids follow the selection."""
    unknown = [name for name in classes if name not in class_names]
    if unknown or len(set(classes)) != len(classes):
        raise ValueError(f"data.classes={list(classes)}: unknown {unknown} or repeated names; "
                         f"the data has {class_names}")
    new_label = {class_names.index(name) + 1: k for k, name in enumerate(classes, start=1)}
    selected = []
    for record in records:
        keep = np.isin(record.labels, list(new_label))
        if drop_empty and not keep.any():
            continue
        labels = np.asarray([new_label[int(label)] for label in record.labels[keep]], dtype=np.int64)
        selected.append(replace(record, boxes=record.boxes[keep], labels=labels, ignore=record.ignore[keep]))
    new_cat_ids = [cat_ids[class_names.index(name)] for name in classes] if cat_ids is not None else None
    return selected, list(classes), new_cat_ids


def _load_all(data: Mapping[str, Any], split: str) -> tuple[list[ImageRecord], list[str], list[int] | None]:
    if data["format"] not in FORMATS:
        raise ValueError(f"data.format={data['format']!r} is not one of {list(FORMATS)}")
    part = data[split]
    if data["format"] == "coco":
        return load_coco_records(part["images"], part["annotations"], skip_invalid=data["skip_invalid"])
    class_names = list(data["class_names"] or VOC_CLASSES)
    roots = (part.get("roots") or [data["root"]]) if split == "train" else [data["root"]]
    records = [record for root in roots for record in
               load_voc_records(root, part["split"], class_names=class_names, skip_invalid=data["skip_invalid"])]
    return records, class_names, None


def check_classes(num_classes: int, class_names: list[str], val_class_names: list[str]) -> None:
    """Both splits must name the same classes, as many as the model predicts, or a label index means different
    classes in training and evaluation (or training dies on an out-of-range label)."""
    if class_names != val_class_names or len(class_names) != num_classes:
        raise ValueError(f"model.num_classes={num_classes} but the data has {len(class_names)} "
                         f"classes {class_names} (val: {len(val_class_names)})")


def build_dataset(data: Mapping[str, Any], records: Sequence[ImageRecord], train: bool,
                  report_dir: str | Path | None = None) -> DetectionDataset:
    """The split's dataset with its transform; an image that fails to decode mid-run is skipped and listed in
    `report_dir/invalid_<split>.txt` with `data.skip_invalid`, else stops the run naming it."""
    transform = build_det_transforms(train, data["min_size"], data["max_size"], flip_prob=data["flip_prob"])
    report = Path(report_dir) / f"invalid_{'train' if train else 'val'}.txt" if report_dir is not None else None
    return DetectionDataset(records, transform, invalid=InvalidFiles(data["skip_invalid"], report),
                            replace_skipped=train)


def build_evaluator(metric: str, backend: str, data: Mapping[str, Any], records: list[ImageRecord],
                    class_names: list[str], cat_ids: list[int] | None) -> CocoEvaluator | VOCEvaluator:
    """COCO AP against the original json (crowd regions included) or against the records (with `data.val_limit`
    or `data.classes`: the json would hold images or categories the model never saw); VOC AP on records."""
    if metric not in METRICS:
        raise ValueError(f"eval.metric={metric!r} is not one of {list(METRICS)}")
    if metric == "coco":
        if data["format"] == "coco" and not data["val_limit"] and not data["classes"]:
            return CocoEvaluator(data["val"]["annotations"], cat_ids, backend=backend)
        ids = cat_ids or list(range(1, len(class_names) + 1))
        return CocoEvaluator(records_to_coco(records, class_names, ids), ids, backend=backend)
    return VOCEvaluator(records, class_names, use_07_metric=metric == "voc07")
