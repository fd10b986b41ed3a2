"""A tiny synthetic COCO-format detection set (circles, squares, triangles) for smoke tests and overfitting
checks that need no downloads. Shapes never overlap, so every box is the exact, fully visible extent."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

SHAPES_CLASSES = ("circle", "square", "triangle")  # COCO category ids 1, 2, 3
_VERSION = 1  # bump when the drawing changes, so old DONE.json markers no longer match


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random colour gradient with pixel noise, so detectors cannot rely on a flat background."""
    corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
    smooth = cv2.resize(corners, (width, height), interpolation=cv2.INTER_LINEAR)
    noise = rng.normal(0.0, 12.0, size=(height, width, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _draw(mask: np.ndarray, shape: str, x: int, y: int, size: int) -> None:
    """Rasterise a filled shape with its size x size bounding square at (x, y) into a uint8 mask."""
    last = size - 1
    if shape == "circle":
        cv2.circle(mask, (x + last // 2, y + last // 2), last // 2, 255, thickness=-1)
    elif shape == "square":
        cv2.rectangle(mask, (x, y), (x + last, y + last), 255, thickness=-1)
    else:
        points = np.array([[x, y + last], [x + last, y + last], [x + last // 2, y]], dtype=np.int32)
        cv2.fillPoly(mask, [points], 255)


def _image(rng: np.random.Generator, height: int, width: int, max_objects: int) -> tuple[np.ndarray, list[dict]]:
    """One BGR image and its annotations (category_id, bbox xywh, area) without ids."""
    image = _background(rng, height, width)
    short = min(height, width)
    lo, hi = max(4, round(short * 16 / 128)), max(5, round(short * 56 / 128))
    occupied = np.zeros((height, width), dtype=bool)
    annotations = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # rejection-sample a free spot; a crowded image just gets fewer shapes
            size = int(rng.integers(lo, min(hi, short) + 1))
            x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
            if not occupied[y:y + size, x:x + size].any():
                break
        else:
            continue
        category = int(rng.integers(len(SHAPES_CLASSES)))
        mask = np.zeros((height, width), dtype=np.uint8)
        _draw(mask, SHAPES_CLASSES[category], x, y, size)
        colour = (image[y:y + size, x:x + size].mean(axis=(0, 1)) + rng.integers(80, 176, size=3)) % 256
        image[mask > 0] = colour.astype(np.uint8)
        occupied[y:y + size, x:x + size] = True
        bx, by, bw, bh = cv2.boundingRect(mask)  # the tight box of the drawn pixels, x + w exclusive
        annotations.append({"category_id": category + 1, "bbox": [bx, by, bw, bh],
                            "area": int(cv2.countNonZero(mask)), "iscrowd": 0})
    return image, annotations


def _write_split(root: Path, split: str, count: int, rng: np.random.Generator, height: int, width: int,
                 max_objects: int) -> None:
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        image, anns = _image(rng, height, width, max_objects)
        file_name = f"{image_id:06d}.png"
        cv2.imwrite(str(root / split / file_name), image)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        annotations += [{"id": len(annotations) + k + 1, "image_id": image_id, **a} for k, a in enumerate(anns)]
    categories = [{"id": k, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES_CLASSES, start=1)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def generate_shapes_dataset(root: str | Path, *, num_train: int = 200, num_val: int = 50,
                            image_size: tuple[int, int] | int = (128, 128), max_objects: int = 3,
                            seed: int = 0) -> Path:
    """Write `root/{train,val}/*.png` and `root/annotations/instances_{train,val}.json` (image_size is
    (height, width)). Deterministic in its arguments; returns at once when `root/DONE.json` records the same
    arguments, otherwise replaces whatever a previous call wrote."""
    root = Path(root)
    height, width = (image_size, image_size) if isinstance(image_size, int) else map(int, image_size)
    params = {"num_train": num_train, "num_val": num_val, "image_size": [height, width],
              "max_objects": max_objects, "seed": seed, "version": _VERSION}
    marker = root / "DONE.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    if min(height, width) < 8 or max_objects < 1:
        raise ValueError(f"image_size {image_size!r} must be >= 8 px and max_objects {max_objects} >= 1")
    marker.unlink(missing_ok=True)
    for stale in ("train", "val", "annotations"):
        shutil.rmtree(root / stale, ignore_errors=True)
    (root / "annotations").mkdir(parents=True)
    for index, (split, count) in enumerate([("train", num_train), ("val", num_val)]):
        rng = np.random.default_rng([seed, index])  # per-split streams: num_train does not change the val set
        _write_split(root, split, count, rng, height, width, max_objects)
    marker.write_text(json.dumps(params))  # last, so an interrupted run is redone
    return root
