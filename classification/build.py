"""From the `data` section of a classification config to datasets: shared by tools/train_cls.py and the
experiments that pretrain with it, so they read data the same way."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from torch.utils.data import Dataset, Subset

from datafiles.demo import prepare_demo_data
from engine.config import CONFIGS_DIR

from .datasets import build_cls_dataset
from .synthetic import generate_imagefolder

DEFAULT_CONFIG = CONFIGS_DIR / "cls" / "default.yaml"  # the classification schema: every cls config overrides it


def prepare_synthetic(data: Mapping[str, Any]) -> None:
    """The built-in demo data when the config turns it on (`data.synthetic.enabled`, see `datafiles.demo`):
    generated once (ImageFolder layout) into its own folder `data.root`."""
    spec = data["synthetic"]
    if spec["enabled"]:
        if data["format"] != "imagefolder":
            raise ValueError(f"data.synthetic writes an ImageFolder, but data.format={data['format']!r}")
        prepare_demo_data(data["root"], partial(generate_imagefolder, num_classes=spec["num_classes"],
                                                train_per_class=spec["train_per_class"],
                                                val_per_class=spec["val_per_class"], image_size=spec["image_size"]))


def build_dataset(data: Mapping[str, Any], split: str, transform: Callable | None = None) -> Dataset:
    """`split` ("train" or "val") of `data.root` in `data.format`, yielding (image, label) with `.classes`."""
    return build_cls_dataset(data["format"], data["root"], split, transform)


def check_classes(train: Dataset, val: Dataset, root: str) -> list[str]:
    """The class list both splits share (label indices mean the same class in both), or a ValueError."""
    if val.classes != train.classes:
        raise ValueError(f"train has {len(train.classes)} classes, val has {len(val.classes)}: the splits of "
                         f"{root} must list the same classes")
    return train.classes


def limit_samples(dataset: Dataset, limit: int | None) -> Dataset:
    """`limit` images evenly spaced over the dataset (`data.train_limit` / `data.val_limit`; None: all): folders
    list samples class by class, so a prefix would hold only the first few classes."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, [i * len(dataset) // limit for i in range(limit)])
