"""From the `data` / `eval` sections of a detection config to records, datasets and evaluators.

Shared by tools/train_det.py, test_det.py and visualize_det.py so they read data the same way.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping

from engine.demo_data import prepare_demo_data

from .datasets import VOC_CLASSES, DetectionDataset, ImageRecord, load_coco_records, load_voc_records
from .evaluation import CocoEvaluator, VOCEvaluator, records_to_coco
from .synthetic import generate_shapes_dataset
from .transforms import build_det_transforms

FORMATS = ("coco", "voc")
METRICS = ("coco", "voc07", "voc12")


def prepare_synthetic(data: Mapping[str, Any]) -> None:
    """The built-in demo data when the config turns it on (`data.synthetic.enabled: true`, see
    `engine.demo_data`): generated once into its own folder `data.root`."""
    spec = data["synthetic"]
    if spec["enabled"] is True:
        prepare_demo_data(data["root"], partial(generate_shapes_dataset, num_train=spec["num_train"],
                                                num_val=spec["num_val"], image_size=spec["image_size"]))


def load_split(data: Mapping[str, Any], split: str) -> tuple[list[ImageRecord], list[str], list[int] | None]:
    """Records, class names and (COCO) category ids of `data.train` or `data.val` (the first
    `data.<split>_limit` images when set)."""
    records, class_names, cat_ids = _load_all(data, split)
    return records[: data[f"{split}_limit"]], class_names, cat_ids


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


def build_dataset(data: Mapping[str, Any], records: list[ImageRecord], train: bool) -> DetectionDataset:
    sizes = list(data["min_size"]) if not isinstance(data["min_size"], int) else [data["min_size"]]
    transform = build_det_transforms(train, sizes if train else max(sizes), data["max_size"], flip_prob=data["flip_prob"])
    return DetectionDataset(records, transform)


def build_evaluator(metric: str, backend: str, data: Mapping[str, Any], records: list[ImageRecord],
                    class_names: list[str], cat_ids: list[int] | None) -> CocoEvaluator | VOCEvaluator:
    """COCO AP against the original json (crowd regions included) or against the records; VOC AP on records."""
    if metric not in METRICS:
        raise ValueError(f"eval.metric={metric!r} is not one of {list(METRICS)}")
    if metric == "coco":
        if data["format"] == "coco" and not data["val_limit"]:
            return CocoEvaluator(data["val"]["annotations"], cat_ids, backend=backend)
        ids = cat_ids or list(range(1, len(class_names) + 1))
        return CocoEvaluator(records_to_coco(records, class_names, ids), ids, backend=backend)
    return VOCEvaluator(records, class_names, use_07_metric=metric == "voc07")
