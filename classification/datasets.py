"""Classification datasets: ImageNet-style folders and the Tiny-ImageNet layout, same contract.

Every dataset yields `(image, label_int)` and exposes `.classes` (sorted wnids/names), so the
train and val splits of one root always agree on label indices. Images are decoded with PIL, which ignores
EXIF orientation: the same policy as detection and segmentation (datafiles/images.py).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder, VisionDataset

from datafiles.images import DatasetError, inside
from datafiles.validation import FileCheck, validate_files, validation_mode

from .cifar import build_cifar

FORMATS = ("imagefolder", "tiny-imagenet", "cifar10", "cifar100")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image as RGB (Tiny-ImageNet has ~2 % grayscale files); failures name the file (a DatasetError:
    met in a DataLoader worker, it reaches the main process with its own message)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:  # includes UnidentifiedImageError and truncated files
        raise DatasetError(f"{path}: cannot decode image ({e}); re-copy or remove it (data.validate=full checks "
                           "every file before training)") from e


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    return path


def build_cls_dataset(
    fmt: str, root: str | Path, split: str, transform: Callable | None
) -> Dataset:
    """Build one split of a classification dataset in format `fmt` (see `FORMATS`)."""
    root = Path(root)
    if fmt == "imagefolder":
        return ImageFolder(_require_dir(root / split), transform=transform, loader=load_rgb)
    if fmt == "tiny-imagenet":
        classes = tiny_imagenet_classes(root)
        if split == "train":
            return _ClassListImageFolder(_require_dir(root / "train"), classes, transform)
        if split == "val":
            return TinyImageNetVal(root, classes, transform)
        raise ValueError(f"tiny-imagenet has splits 'train' and 'val', got {split!r} ({root})")
    if fmt in ("cifar10", "cifar100"):
        return build_cifar(fmt, root, split, transform)
    raise ValueError(f"unknown dataset format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def tiny_imagenet_classes(root: Path) -> list[str]:
    """Sorted wnids from `wnids.txt`, else from the train folders (the official file is unsorted)."""
    wnids_file = root / "wnids.txt"
    if wnids_file.is_file():
        wnids = wnids_file.read_text().split()
        if not wnids:
            raise ValueError(f"no class ids in {wnids_file}")
        return sorted(set(wnids))
    train = _require_dir(root / "train")
    return sorted(p.name for p in train.iterdir() if p.is_dir())


class _ClassListImageFolder(ImageFolder):
    """ImageFolder whose classes come from a given list instead of every subfolder.

    ImageFolder walks class folders recursively, so Tiny-ImageNet's extra `images/` level and the
    `<wnid>_boxes.txt` files (not image extensions) need nothing special.
    """

    def __init__(self, root: Path, classes: list[str], transform: Callable | None) -> None:
        self._class_list = classes
        super().__init__(root, transform=transform, loader=load_rgb)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._class_list, {c: i for i, c in enumerate(self._class_list)}


class TinyImageNetVal(VisionDataset):
    """Tiny-ImageNet val: one flat `val/images/` folder labelled by `val/val_annotations.txt`.

    Hand-written because torchvision has no reader for this layout (labels live in a text file).
    """

    def __init__(self, root: Path, classes: list[str], transform: Callable | None) -> None:
        super().__init__(root, transform=transform)
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        images = _require_dir(root / "val" / "images")
        ann_file = root / "val" / "val_annotations.txt"
        if not ann_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {ann_file}")
        self.samples: list[tuple[str, int]] = []
        for lineno, line in enumerate(ann_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise ValueError(f"{ann_file}:{lineno}: expected 'filename<TAB>wnid...', got {line!r}")
            name, wnid = fields[0], fields[1]
            if wnid not in self.class_to_idx:
                raise ValueError(f"{ann_file}:{lineno}: unknown wnid {wnid!r} (not in the class list)")
            inside(images, name, f"{ann_file}:{lineno}")
            if not (images / name).is_file():
                raise FileNotFoundError(f"{ann_file}:{lineno}: image {images / name} not found")
            self.samples.append((str(images / name), self.class_to_idx[wnid]))
        if not self.samples:
            raise ValueError(f"no samples listed in {ann_file}")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def validate_dataset(dataset: Dataset, *, split: str = "train", validate: str | bool = "auto",
                     skip_invalid: bool = False, report_dir: str | Path | None = None, num_workers: int | None = None,
                     cache_dir: str | Path | None = None) -> Dataset:
    """Check the images of an ImageFolder / Tiny-ImageNet split as `validate` (`data.validate`: auto | full |
    header | false) says (datafiles.validation: full decodes are parallel, sharded over ranks and cached outside the
    data folder; call it on every rank); with `skip_invalid`, bad files are dropped from `samples`, counted and
    listed in `report_dir/invalid_<split>.txt`. A train split with fewer than two classes has nothing to learn."""
    samples = dataset.samples
    mode = validation_mode(validate, len(samples))
    skipped: set[int] = set()
    if mode is not None:
        checks = [FileCheck(Path(path), where=f"class {dataset.classes[label]!r}", opencv=False)
                  for path, label in samples]
        skipped, _ = validate_files(checks, skip_invalid=skip_invalid, report_dir=report_dir, split=split, mode=mode,
                                    num_workers=num_workers, cache_dir=cache_dir)
    kept = [sample for index, sample in enumerate(samples) if index not in skipped]
    present = {label for _, label in kept}
    if not kept or (split == "train" and len(present) < 2):
        raise DatasetError(f"{split} split ({getattr(dataset, 'root', '?')}): {len(kept)} usable image(s) in "
                           f"{len(present)} class(es): nothing to learn from; a classifier needs images of at least "
                           "two classes")
    dataset.samples = kept
    dataset.targets = [label for _, label in kept]
    if hasattr(dataset, "imgs"):
        dataset.imgs = kept
    return dataset
