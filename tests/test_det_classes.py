"""data.classes: restrict COCO / VOC detection data to some classes, relabelled 1..K in the given order."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from detection.build import build_evaluator, load_split
from detection.predictor import label_space

ROOT = Path(__file__).resolve().parents[1]


def _coco(tmp_path: Path) -> Path:
    """3 images; categories 1 person, 3 car, 18 dog; image 12 has only a car, image 13 nothing."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in ("a", "b", "c"):
        cv2.imwrite(str(tmp_path / "images" / f"{name}.jpg"), np.zeros((20, 30, 3), np.uint8))
    coco = {"images": [{"id": 11 + i, "file_name": f"{n}.jpg", "width": 30, "height": 20} for i, n in enumerate("abc")],
            "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 11, "category_id": 18, "bbox": [1, 1, 5, 5], "iscrowd": 0},
                {"id": 2, "image_id": 11, "category_id": 1, "bbox": [2, 2, 6, 6], "iscrowd": 0},
                {"id": 3, "image_id": 11, "category_id": 3, "bbox": [3, 3, 7, 7], "iscrowd": 0},
                {"id": 4, "image_id": 11, "category_id": 1, "bbox": [0, 0, 30, 20], "iscrowd": 1},
                {"id": 5, "image_id": 12, "category_id": 3, "bbox": [4, 4, 8, 8], "iscrowd": 0}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return tmp_path


def _data(coco_dir: Path, **overrides):
    data = OmegaConf.load(ROOT / "configs" / "det" / "default.yaml").data
    data.synthetic.enabled = False
    data.val.images, data.val.annotations = str(coco_dir / "images"), str(coco_dir / "instances.json")
    for key, value in overrides.items():
        data[key] = value
    return data


def test_coco_classes_relabel_in_given_order_and_keep_negatives(tmp_path):
    data = _data(_coco(tmp_path), classes=["dog", "person"])
    records, names, cat_ids = load_split(data, "val")
    assert names == ["dog", "person"] and cat_ids == [18, 1]
    by_id = {r.image_id: r for r in records}
    assert sorted(by_id) == [11, 12, 13]  # 12 (only a car) and 13 (empty) stay as negatives
    a = by_id[11]
    assert a.labels.tolist() == [1, 2, 2] and a.ignore.tolist() == [False, False, True]  # the car is gone
    np.testing.assert_array_equal(a.boxes[:2], [[1, 1, 6, 6], [2, 2, 8, 8]])
    assert len(by_id[12].labels) == 0 and by_id[12].boxes.shape == (0, 4)

    # COCO AP is computed on the kept records: only the selected categories, with their original ids
    evaluator = build_evaluator("coco", "faster_coco_eval", data, records, names, cat_ids)
    assert [c["id"] for c in evaluator.coco_gt["categories"]] == [18, 1]
    assert {a["category_id"] for a in evaluator.coco_gt["annotations"]} == {18, 1}
    evaluator.update(11, [[1, 1, 6, 6], [2, 2, 8, 8]], [0.9, 0.8], [1, 2])
    assert evaluator.compute()["AP50"] == pytest.approx(1.0)


def test_predictor_names_and_ids_follow_data_classes(tmp_path):
    """The Predictor (and visualize_det / predict.py through it) labels with the selected classes, in the
    training order, with their COCO ids: the same label space as load_split's."""
    data = _data(_coco(tmp_path), classes=["dog", "person"])
    cfg = OmegaConf.create({"data": data, "model": {"num_classes": 2}})
    assert label_space(cfg) == (["dog", "person"], [18, 1]) == tuple(load_split(data, "val")[1:])
    cfg.data.classes = None
    cfg.model.num_classes = 3
    assert label_space(cfg) == (["person", "car", "dog"], [1, 3, 18])
    cfg.data.classes, cfg.model.num_classes = ["cat"], 1
    with pytest.raises(ValueError, match=r"data.classes=\['cat'\]: unknown \['cat'\]"):
        label_space(cfg)


def test_coco_classes_drop_empty_and_unknown_names(tmp_path):
    records, names, _ = load_split(_data(_coco(tmp_path), classes=["car"], classes_drop_empty=True), "val")
    assert names == ["car"] and sorted(r.image_id for r in records) == [11, 12]
    assert all(r.labels.tolist() == [1] for r in records)
    with pytest.raises(ValueError, match=r"unknown \['cat'\].*'person', 'car', 'dog'"):
        load_split(_data(_coco(tmp_path), classes=["cat"]), "val")
    with pytest.raises(ValueError, match="repeated"):
        load_split(_data(_coco(tmp_path), classes=["car", "car"]), "val")


def test_voc_classes_select_from_the_full_class_list(tmp_path):
    root = tmp_path / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    cv2.imwrite(str(root / "JPEGImages" / "x.jpg"), np.zeros((16, 20, 3), np.uint8))
    (root / "Annotations" / "x.xml").write_text(
        "<annotation><size><width>20</width><height>16</height></size>"
        "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object>"
        "<object><name>person</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>16</ymax></bndbox>"
        "</object></annotation>")
    (root / "ImageSets" / "Main" / "test.txt").write_text("x\n")
    data = _data(tmp_path, format="voc", root=str(root), classes=["person"])
    records, names, cat_ids = load_split(data, "val")
    assert names == ["person"] and cat_ids is None
    assert records[0].labels.tolist() == [1] and records[0].boxes.tolist() == [[4, 4, 20, 16]]
