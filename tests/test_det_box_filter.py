"""data.min_box_size: degenerate boxes (BCCD's xmin == xmax) are dropped from training by one rule for COCO and VOC,
every one named in the log with its file and coordinates; val boxes stay as annotated (named too)."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from detection.build import drop_small_boxes, load_split
from engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"


def _voc(root: Path) -> Path:
    """One 40x30 image: a 1x1 box (xmin == xmax, ymin == ymax: 1 px under VOC's inclusive corners) and a real one."""
    (root / "JPEGImages").mkdir(parents=True)
    cv2.imwrite(str(root / "JPEGImages" / "a.jpg"), np.full((30, 40, 3), 90, np.uint8))
    objects = "".join(f"<object><name>cell</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                      f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for x1, y1, x2, y2 in
                      [(5, 6, 5, 6), (10, 10, 30, 25)])
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(f"<annotation><filename>a.jpg</filename><size><width>40</width>"
                                                f"<height>30</height></size>{objects}</annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("a\n")
    return root


def _coco(root: Path) -> Path:
    """The same image and boxes as COCO json: [x, y, w, h] = [4, 5, 1, 1] and a real one."""
    (root / "images").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "a.jpg"), np.full((30, 40, 3), 90, np.uint8))
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
            "categories": [{"id": 1, "name": "cell"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 5, 1, 1], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [9, 9, 21, 16], "iscrowd": 0}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def _data(fmt: str, root: Path, *overrides: str):
    if fmt == "voc":
        args = [f"data.root={root}", "data.format=voc", "data.class_names=[cell]", "data.train.split=train",
                "data.val.split=val"]
    else:
        args = [f"data.root={root}", "data.format=coco", *(f"data.{s}.images={root}/images" for s in ("train", "val")),
                *(f"data.{s}.annotations={root}/instances.json" for s in ("train", "val"))]
    return load_config(ROOT / "configs" / "det" / "default.yaml", None, [*args, *overrides]).data


@pytest.mark.parametrize("fmt, write", [("voc", _voc), ("coco", _coco)])
def test_one_rule_for_coco_and_voc_train_drops_val_keeps_both_named(tmp_path, caplog, fmt, write):
    data = _data(fmt, write(tmp_path / fmt))
    train, _, _ = load_split(data, "train")
    np.testing.assert_array_equal(train[0].boxes, [[9, 9, 30, 25]])  # the 1x1 box is gone, the real one stays
    assert "train split: 1 box(es) narrower or lower than data.min_box_size=2 px, dropped before training" in caplog.text
    assert "a.jpg cell [4.0, 5.0, 5.0, 6.0]" in caplog.text  # file, class and coordinates of every such box
    caplog.clear()
    val, _, _ = load_split(data, "val")
    assert len(val[0].boxes) == 2 and "val split: 1 box(es)" in caplog.text and "kept" in caplog.text
    kept, _, _ = load_split(_data(fmt, tmp_path / fmt, "data.min_box_size=0"), "train")
    assert len(kept[0].boxes) == 2  # 0 keeps everything


def test_drop_small_boxes_checks_width_and_height_separately(tmp_path):
    records, _, _ = load_split(_data("voc", _voc(tmp_path / "voc"), "data.min_box_size=0"), "train")
    thin = replace(records[0], boxes=np.array([[4, 5, 5, 6], [10, 10, 30, 11.5]], np.float32))  # 20 px wide, 1.5 high
    kept, small = drop_small_boxes([thin], 2.0)
    assert kept[0].boxes.shape == (0, 4) and [box for _, box, _ in small] == [[4.0, 5.0, 5.0, 6.0], [10.0, 10.0, 30.0, 11.5]]
    assert len(kept[0].labels) == len(kept[0].ignore) == 0


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD not found at {BCCD} (../shared/data/bccd beside the checkout)")
def test_bccd_degenerate_boxes_are_named(caplog):
    caplog.set_level(logging.WARNING)
    data = load_config(ROOT / "configs" / "det" / "default.yaml", ROOT / "configs" / "det" / "bccd.yaml",
                       [f"data.root={BCCD}"]).data
    train, _, _ = load_split(data, "train")
    assert sum(len(r.boxes) for r in train) == 2804  # 2805 annotated, BloodImage_00343's 1x1 box dropped
    assert "BloodImage_00343.jpg RBC [180.0, 328.0, 181.0, 329.0]" in caplog.text
    load_split(data, "val")
    assert "BloodImage_00338.jpg RBC [503.0, 336.0, 504.0, 337.0]" in caplog.text


def test_coco_zero_width_box_is_dropped_and_named_even_with_min_box_size_0(tmp_path, caplog):
    """A COCO box of width 0 loads (no DatasetError) and is dropped from training by the same rule, whatever
    data.min_box_size says: torchvision's detector refuses zero-size boxes mid-run."""
    root = _coco(tmp_path / "coco")
    coco = json.loads((root / "instances.json").read_text())
    coco["annotations"][0]["bbox"] = [4, 5, 0, 3]
    (root / "instances.json").write_text(json.dumps(coco))
    train, _, _ = load_split(_data("coco", root, "data.min_box_size=0"), "train")
    np.testing.assert_array_equal(train[0].boxes, [[9, 9, 30, 25]])
    assert "train split: 1 box(es) of zero width or height, dropped before training" in caplog.text
    assert "a.jpg cell [4.0, 5.0, 4.0, 8.0]" in caplog.text
    val, _, _ = load_split(_data("coco", root, "data.min_box_size=0"), "val")
    assert len(val[0].boxes) == 2  # val keeps it: the evaluation follows the annotations
