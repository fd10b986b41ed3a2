"""CIFAR-10 / CIFAR-100 in the official python layout, read by torchvision's CIFAR10 / CIFAR100 (download=False).

    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/     train, test, meta

`root` may be that folder or its parent (torchvision's convention). The subclasses only change torchvision's
file lists: they drop the md5 sums, so the integrity check becomes "every file exists". An md5 check would
reject any copy that is not byte-identical to the 2009 archives (a re-pickled copy, a generated test
fixture), while a truncated or corrupted pickle still fails loudly when it is loaded. No download here:
the files must already be on disk.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torchvision.datasets import CIFAR10, CIFAR100

SPLITS = ("train", "val")  # val = the official test set (the paper reports CIFAR-10 test error)


class Cifar10(CIFAR10):
    """torchvision's CIFAR10 with the md5 sums dropped (see the module docstring)."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class Cifar100(CIFAR100):
    """torchvision's CIFAR100 with the md5 sums dropped (see the module docstring)."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def build_cifar(fmt: str, root: str | Path, split: str, transform: Callable | None) -> Cifar10 | Cifar100:
    """Split `train` or `val` (the official test set) of format `cifar10` / `cifar100`; yields (PIL image, label)
    and has `.classes` (from the meta file, in label order)."""
    cls = {"cifar10": Cifar10, "cifar100": Cifar100}[fmt]
    if split not in SPLITS:
        raise ValueError(f"{fmt} has splits {list(SPLITS)}, got {split!r}")
    root = Path(root)
    parent = root.parent if root.name == cls.base_folder else root
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [name for name in files if not (parent / cls.base_folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{fmt}: {parent / cls.base_folder} lacks {missing} (the official python version, "
                                f"e.g. {cls.filename} unpacked; nothing is downloaded)")
    return cls(str(parent), train=split == "train", transform=transform, download=False)
