"""From the `data` section of a segmentation config to datasets: shared by train_seg, test_seg and visualize_seg
so they read data the same way."""
from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import albumentations as A
from torch.utils.data import Subset

from datafiles.demo import prepare_demo_data
from engine.config import CONFIGS_DIR

from .datasets import COCO_TO_VOC, CocoSemantic, SegmentationDataset, VOCSegmentation
from .palette import VOC_SEG_CLASSES
from .synthetic import SHAPES_SEG_CLASSES, generate_shapes_segmentation

DEFAULT_CONFIG = CONFIGS_DIR / "seg" / "default.yaml"  # the segmentation schema: every seg config overrides it
CLASS_MAPPINGS = {None: None, "coco_to_voc": COCO_TO_VOC}
FORMATS = ("voc", "coco")


def prepare_synthetic(data: Mapping[str, Any]) -> None:
    """The built-in demo data when the config turns it on (`data.synthetic.enabled: true`, see
    `datafiles.demo`): generated once (VOC layout) into its own folder `data.root`."""
    spec = data["synthetic"]
    if spec["enabled"] is True:
        if data["format"] != "voc":
            raise ValueError("data.synthetic writes a VOC-layout set: use data.format=voc")
        prepare_demo_data(data["root"], partial(generate_shapes_segmentation, num_train=spec["num_train"],
                                                num_val=spec["num_val"], image_size=spec["image_size"]))


def build_dataset(data: Mapping[str, Any], split: str, transform: A.Compose | None = None) -> SegmentationDataset:
    """`data.train` or `data.val` as a dataset; no transform means full-resolution images, as evaluated."""
    part = data[split]
    if data["format"] == "voc":
        class_names = list(data["class_names"] or (SHAPES_SEG_CLASSES if data["synthetic"]["enabled"] is True
                                                   else VOC_SEG_CLASSES))
        return VOCSegmentation(data["root"], part["split"], transform, num_classes=len(class_names),
                               class_names=class_names)
    if data["format"] == "coco":
        if data["class_mapping"] not in CLASS_MAPPINGS:
            raise ValueError(f"data.class_mapping={data['class_mapping']!r} is not one of {list(CLASS_MAPPINGS)}")
        mapping = CLASS_MAPPINGS[data["class_mapping"]]
        class_names = data["class_names"] or (VOC_SEG_CLASSES if mapping is COCO_TO_VOC else None)
        return CocoSemantic(part["images"], part["annotations"], transform, class_mapping=mapping,
                            class_names=class_names)
    raise ValueError(f"data.format={data['format']!r} is not one of {list(FORMATS)}")


def check_classes(num_classes: int, *datasets: SegmentationDataset) -> None:
    """The classifier width must match the labels, or training dies on an out-of-range target (or wastes outputs)."""
    for dataset in datasets:
        if dataset.num_classes != num_classes:
            raise ValueError(f"model.num_classes={num_classes} but the data has {dataset.num_classes} classes "
                             f"{dataset.class_names}; set model.num_classes, or data.class_names / "
                             "data.class_mapping, to match")
        if dataset.class_names != datasets[0].class_names:
            raise ValueError(f"train and val classes differ: {datasets[0].class_names} vs {dataset.class_names}")


def limit_samples(dataset: SegmentationDataset, limit: int | None) -> Subset:
    """The first `limit` samples (`data.val_limit`; None: all)."""
    return Subset(dataset, range(len(dataset) if limit is None else min(limit, len(dataset))))
