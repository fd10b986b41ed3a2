"""Semantic-segmentation datasets: one `SegmentationDataset` over (image, mask source) samples.

VOC label PNGs and COCO instance annotations only differ in where the mask comes from, so both
produce the same samples and share loading, validation and the joint albumentations transform.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from datafiles.images import DatasetError, image_to_tensor, inside, read_image, size_mismatch  # noqa: F401 (re-exported: part of this module's API)
from datafiles.validation import FileCheck, validate_files, validation_mode
from segmentation.palette import VOC_SEG_CLASSES, VOID

IMAGE_SUFFIXES = (".jpg", ".png")
"""Image files are looked up by stem in this order (VOC ships .jpg; the synthetic set writes .png)."""

MaskSource = Path | Callable[[], np.ndarray]
"""A label PNG, or a callable rendering the mask (its `str()` should name where it comes from)."""

Sample = tuple[Path, MaskSource]

COCO_TO_VOC: dict[int, int] = {
    5: 1, 2: 2, 16: 3, 9: 4, 44: 5, 6: 6, 3: 7, 17: 8, 62: 9, 21: 10,
    67: 11, 18: 12, 19: 13, 4: 14, 1: 15, 64: 16, 20: 17, 63: 18, 7: 19, 72: 20,
}
"""COCO category id -> VOC class index for the 20 VOC classes; other categories stay background."""


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label PNG as class indices uint8 [H, W].

    PIL, not cv2: cv2 would turn a palette PNG into its colours instead of its indices. PIL ignores
    EXIF orientation, as `read_image` does for images (datafiles/images.py: one policy for both).
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DatasetError(
                    f"label file {path} has mode {image.mode!r}; expected a palette ('P') or "
                    "greyscale ('L') PNG whose pixel values are class indices"
                )
            return np.array(image)
    except OSError as error:  # FileNotFoundError and PIL's UnidentifiedImageError
        raise DatasetError(f"cannot read label file {path}: {error}") from error


def _load_mask(source: MaskSource) -> np.ndarray:
    return read_mask(source) if isinstance(source, Path) else source()


class SegmentationDataset(torch.utils.data.Dataset):
    """(image float32 [3, H, W] RGB in [0, 1], mask int64 [H, W], 255 = void) pairs.

    Every sample is checked as it is decoded (sizes agree, labels in range), so a bad file fails
    with its name instead of as a shape error deep inside a training step.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        class_names: Sequence[str] | None = None,
        transform: A.Compose | None = None,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        self.samples = list(samples)
        self.num_classes = num_classes
        self.class_names = list(class_names or (f"class_{i}" for i in range(num_classes)))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load_sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The checked, untransformed (image RGB uint8 [H, W, 3], mask uint8 [H, W]) pair."""
        image_path, source = self.samples[index]
        image, mask = read_image(image_path), _load_mask(source)
        if image.shape[:2] != mask.shape:
            raise DatasetError(size_mismatch(image_path, (image.shape[1], image.shape[0]),
                                             (mask.shape[1], mask.shape[0]), f"mask {source}"))
        bad = mask[(mask >= self.num_classes) & (mask != VOID)]
        if bad.size:
            raise DatasetError(
                f"mask {source} has label values {np.unique(bad).tolist()} outside "
                f"[0, {self.num_classes}) and not the void value {VOID}"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load_sample(index)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image_t = (image_to_tensor(image) if image.dtype == np.uint8
                   else torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float())
        return image_t, torch.from_numpy(np.ascontiguousarray(mask)).long()

    def validate(self, *, split: str = "train", validate: str | bool = "auto", skip_invalid: bool = False,
                 report_dir: str | Path | None = None, num_workers: int | None = None,
                 cache_dir: str | Path | None = None) -> None:
        """Check every image and mask now as `validate` (`data.validate`: auto | full | header | false) says
        (datafiles.validation: full decodes are parallel, sharded over ranks and cached outside the data folder;
        call it on every rank), instead of failing mid-epoch. With `skip_invalid`, bad pairs are dropped from
        `samples`, counted and listed in `report_dir/invalid_<split>.txt`. A split without any foreground pixel
        (or COCO object) is refused: there is nothing to learn from (label values are known only from a full
        decode: a header check assumes they hold some)."""
        mode = validation_mode(validate, len(self.samples))
        if mode is None:
            return
        checks = []
        for image_path, source in self.samples:
            if isinstance(source, Path):
                checks += [FileCheck(source, where=f"the mask of {image_path.name}", label=True,
                                     num_classes=self.num_classes, void=VOID),
                           FileCheck(image_path, where=f"mask {source}", same_size_as=source)]
            else:
                info = source.coco.imgs[source.image_id]
                checks += [FileCheck(image_path, where=str(source), size=(info["width"], info["height"]))]
        skipped, info = validate_files(checks, skip_invalid=skip_invalid, report_dir=report_dir, split=split,
                                       mode=mode, num_workers=num_workers, cache_dir=cache_dir)
        kept, foreground, index = [], False, 0
        for image_path, source in self.samples:
            width = 2 if isinstance(source, Path) else 1
            if not skipped.intersection(range(index, index + width)):
                kept.append((image_path, source))
                foreground = foreground or _has_foreground(source, info.get(index))
            index += width
        if not foreground:
            folder = self.samples[0][0].parent if self.samples else "(no images)"
            raise DatasetError(f"{split} split ({folder}): {len(kept)} usable image(s) but no foreground class "
                               "in any mask (all background / void, or crowd only): nothing to learn from; check "
                               "the masks, the annotation file or data.class_mapping")
        self.samples = kept


def _has_foreground(source: MaskSource, info: dict | None) -> bool:
    """Whether a mask holds some class other than background (0) and void."""
    if isinstance(source, Path):
        values = (info or {}).get("values")
        return values is None or any(0 < v < VOID for v in values)  # None: read from the header only
    return any(not a["iscrowd"] and source.class_mapping.get(a["category_id"], 0) > 0
               for a in source.coco.imgToAnns[source.image_id])


def _find_image(images_dir: Path, stem: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{stem}{suffix}"
        if path.is_file():
            return path
    tried = ", ".join(str(images_dir / f"{stem}{s}") for s in IMAGE_SUFFIXES)
    raise DatasetError(f"missing image for {stem!r}: none of {tried} exists")


def load_voc_segmentation(root: str | Path, split: str) -> list[Sample]:
    """Samples of a VOC-layout folder (`root` = the `VOC20xx` folder) for one split."""
    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.name for p in split_file.parent.glob("*.txt"))
        raise DatasetError(f"missing split file {split_file}; available split files: {available}")
    samples: list[Sample] = []
    for stem in split_file.read_text().split():
        mask_path = inside(root / "SegmentationClass", f"{stem}.png", f"{split_file}: entry {stem!r}")
        if not mask_path.is_file():
            raise DatasetError(f"missing label file {mask_path} (listed in {split_file})")
        samples.append((_find_image(root / "JPEGImages", stem), mask_path))
    return samples


class VOCSegmentation(SegmentationDataset):
    """A VOC-layout split; class names default to VOC's when there are 21 classes."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: A.Compose | None = None,
        num_classes: int = len(VOC_SEG_CLASSES),
        class_names: Sequence[str] | None = None,
    ) -> None:
        if class_names is None and num_classes == len(VOC_SEG_CLASSES):
            class_names = VOC_SEG_CLASSES
        super().__init__(load_voc_segmentation(root, split), num_classes, class_names, transform)


@dataclass(frozen=True, eq=False)
class CocoMaskSource:
    """Renders one image's semantic mask from its COCO instance annotations."""

    coco: COCO
    image_id: int
    class_mapping: Mapping[int, int]
    annotations_json: Path

    def __str__(self) -> str:
        return f"{self.annotations_json} (image id {self.image_id})"

    def __call__(self) -> np.ndarray:
        info = self.coco.imgs[self.image_id]
        mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        anns = [
            a for a in self.coco.imgToAnns[self.image_id]
            if self.class_mapping.get(a["category_id"], 0) > 0  # unmapped categories: background
        ]
        # Largest first, crowds included: a smaller overlapping region is drawn last and wins.
        anns.sort(key=lambda a: -a["area"])
        for ann in anns:
            label = VOID if ann["iscrowd"] else self.class_mapping[ann["category_id"]]
            mask[self.coco.annToMask(ann) > 0] = label
        return mask


class CocoSemantic(SegmentationDataset):
    """COCO instance annotations rendered as semantic masks (0 = background, crowds = void).

    `class_mapping` maps COCO category id -> class index (e.g. `COCO_TO_VOC`); categories it
    leaves out, or maps to 0, count as background. Default: all categories as 1..K by sorted id.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotations_json: str | Path,
        transform: A.Compose | None = None,
        class_mapping: Mapping[int, int] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        images_dir, annotations_json = Path(images_dir), Path(annotations_json)
        if not annotations_json.is_file():
            raise DatasetError(f"missing annotation file {annotations_json}")
        coco = COCO(str(annotations_json))
        if class_mapping is None:
            class_mapping = {cat_id: i + 1 for i, cat_id in enumerate(sorted(coco.cats))}
        num_classes = max(class_mapping.values(), default=0) + 1
        if class_names is None:
            class_names = ["background"] + [
                "/".join(coco.cats[c]["name"] for c in sorted(class_mapping) if class_mapping[c] == i)
                for i in range(1, num_classes)
            ]
        samples: list[Sample] = []
        for image_id in sorted(coco.imgs):
            image_path = inside(images_dir, str(coco.imgs[image_id]["file_name"]),
                                f"{annotations_json}: image id {image_id}")
            if not image_path.is_file():
                raise DatasetError(f"missing image {image_path} (listed in {annotations_json})")
            samples.append((image_path, CocoMaskSource(coco, image_id, dict(class_mapping), annotations_json)))
        super().__init__(samples, num_classes, class_names, transform)
