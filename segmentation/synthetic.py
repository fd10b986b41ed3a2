"""A tiny synthetic VOC-layout segmentation set (circles, squares, triangles) for smoke tests.

Images are PNG (no JPEG artefacts, so the only label noise is the void border, as in VOC).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segmentation.datasets import DatasetError
from segmentation.palette import VOID, save_palette_png

SHAPES_SEG_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle")


def _draw_shape(
    canvas: np.ndarray, label: int, center: np.ndarray, radius: int, value: int | tuple[int, ...], thickness: int
) -> None:
    """Draw one shape filled (thickness -1) or as its 1-px outline (thickness 1)."""
    cx, cy = (int(v) for v in center)
    if label == 1:
        cv2.circle(canvas, (cx, cy), radius, value, thickness)
        return
    if label == 2:
        corners = [(cx - radius, cy - radius), (cx + radius, cy - radius),
                   (cx + radius, cy + radius), (cx - radius, cy + radius)]
    else:
        corners = [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
    points = np.array(corners, dtype=np.int32).reshape(-1, 1, 2)
    if thickness < 0:
        cv2.fillPoly(canvas, [points], value)
    else:
        cv2.polylines(canvas, [points], True, value, thickness)


def _render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB image, mask) pair: noisy background, 1-3 shapes, later shapes on top."""
    background = rng.integers(0, 100, size=3)
    image = np.clip(background + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        label = int(rng.integers(1, len(SHAPES_SEG_CLASSES)))
        radius = int(rng.integers(size // 10, size // 4))
        center = rng.integers(radius, size - radius, size=2)
        color = tuple(int(c) for c in rng.integers(120, 256, size=3))
        _draw_shape(image, label, center, radius, color, -1)
        _draw_shape(mask, label, center, radius, label, -1)
        _draw_shape(mask, label, center, radius, VOID, 1)  # VOC-like void border
    return image, mask


def generate_shapes_segmentation(
    root: str | Path,
    *,
    num_train: int = 60,
    num_val: int = 20,
    image_size: int = 96,
    seed: int = 0,
) -> Path:
    """Write the set under `root` (VOC layout, classes `SHAPES_SEG_CLASSES`) and return `root`.

    Deterministic in its parameters; a `DONE.json` marker holding them makes repeat calls free.
    """
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    marker = root / "DONE.json"
    if marker.is_file():
        existing = json.loads(marker.read_text())
        if existing != params:
            raise DatasetError(f"{marker} was written with {existing}, not {params}; use another root or delete it")
        return root
    images_dir, masks_dir = root / "JPEGImages", root / "SegmentationClass"
    splits_dir = root / "ImageSets" / "Segmentation"
    for folder in (images_dir, masks_dir, splits_dir):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stems = [f"{i:05d}" for i in range(num_train + num_val)]
    for stem in stems:
        image, mask = _render(rng, image_size)
        Image.fromarray(image).save(images_dir / f"{stem}.png")
        save_palette_png(masks_dir / f"{stem}.png", mask)
    (splits_dir / "train.txt").write_text("".join(f"{s}\n" for s in stems[:num_train]))
    (splits_dir / "val.txt").write_text("".join(f"{s}\n" for s in stems[num_train:]))
    marker.write_text(json.dumps(params, indent=2) + "\n")
    return root
