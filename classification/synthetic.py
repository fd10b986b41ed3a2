"""A tiny generated ImageFolder dataset, so the classification pipeline runs with no download.

Each class has its own shape *and* its own hue band (position, size, hue jitter, background and
pixel noise vary), which a small network separates within a few hundred iterations.
"""
from __future__ import annotations

import colorsys
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    """Binary mask of one shape of half-extent `r` centred at (cx, cy)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:  # ring
        draw.ellipse(box, outline=255, width=max(2, round(r / 3)))
    return mask


def _render(rng: np.random.Generator, label: int, num_classes: int, size: int) -> Image.Image:
    """One noisy image of class `label`: its shape, coloured within its hue band, on grey."""
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    mask = np.asarray(_shape_mask(SHAPES[label % len(SHAPES)], size, cx, cy, r), dtype=bool)
    # Hue bands are 1/num_classes wide; jitter stays inside 60 % of the band so classes never overlap.
    hue = (label + rng.uniform(-0.3, 0.3)) / num_classes % 1.0
    colour = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    image = np.full((size, size, 3), rng.uniform(0.2, 0.8), dtype=np.float32)
    image[mask] = colour
    image += rng.normal(0.0, 0.06, size=image.shape)
    return Image.fromarray((image.clip(0.0, 1.0) * 255).round().astype(np.uint8))


def generate_imagefolder(
    root: str | Path,
    *,
    num_classes: int = 4,
    train_per_class: int = 40,
    val_per_class: int = 10,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write `root/{train,val}/<class>/*.png` deterministically; skip if already generated.

    `root/DONE.json` records the parameters; with other parameters (or no marker, i.e. an
    interrupted run) the generator owns `root/train` and `root/val` and rewrites them.
    """
    root = Path(root)
    params = dict(
        num_classes=num_classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        image_size=image_size,
        seed=seed,
    )
    marker = root / "DONE.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    marker.unlink(missing_ok=True)
    classes = [f"class{c:02d}_{SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]
    for split_index, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        shutil.rmtree(root / split, ignore_errors=True)
        for label, name in enumerate(classes):
            # One stream per (seed, split, class): output does not depend on loop order.
            rng = np.random.default_rng([seed, split_index, label])
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _render(rng, label, num_classes, image_size).save(folder / f"{i:04d}.png")
    marker.write_text(json.dumps(params, indent=2))
    return root
