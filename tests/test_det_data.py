"""Detection data: COCO / VOC loading and validation, transforms, the synthetic set and grouped batching."""
import json
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from detection.datasets import (VOC_CLASSES, DatasetError, DetectionDataset, collate, load_coco_records,
                                load_voc_records, read_image)
from detection.samplers import GroupedBatchSampler, aspect_ratio_groups
from detection.synthetic import generate_shapes_dataset
from detection.transforms import build_det_transforms
from engine.sampling import SeededDataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), 90, np.uint8))


# ---------------------------------------------------------------- COCO

def coco_fixture(tmp_path: Path, annotations: list[dict] | None = None) -> tuple[Path, Path]:
    """Two images (a.png 20x16 with annotations, b.png 10x12 without); category ids 7 and 3 (unsorted)."""
    write_image(tmp_path / "images" / "a.png", 20, 16)
    write_image(tmp_path / "images" / "b.png", 10, 12)
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 20, 16], "iscrowd": 1},
        ]
    coco = {"images": [{"id": 5, "file_name": "a.png", "width": 20, "height": 16},
                       {"id": 9, "file_name": "b.png", "width": 10, "height": 12}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
            "annotations": annotations}
    json_path = tmp_path / "instances.json"
    json_path.write_text(json.dumps(coco))
    return tmp_path / "images", json_path


def test_coco_records(tmp_path):
    records, names, cat_ids = load_coco_records(*coco_fixture(tmp_path))
    assert names == ["cat", "dog"] and cat_ids == [3, 7]
    a, b = sorted(records, key=lambda r: r.image_id)
    assert (a.image_id, a.width, a.height, Path(a.path).name) == (5, 20, 16, "a.png")
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 8], [0, 0, 20, 16]])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    assert a.labels.tolist() == [2, 1] and a.ignore.tolist() == [False, True]
    assert b.boxes.shape == (0, 4) and b.labels.shape == (0,)  # negatives are kept


def test_coco_clips_boxes_overhanging_by_at_most_one_pixel(tmp_path):
    ann = [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [-0.5, 1, 21, 15.8], "iscrowd": 0}]
    records, _, _ = load_coco_records(*coco_fixture(tmp_path, ann))
    np.testing.assert_allclose(records[0].boxes, [[0, 1, 20, 16]])


# ---------------------------------------------------------------- VOC

VOC_XML = """<annotation><filename>{name}.jpg</filename>{size}
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>12</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>5</xmin><ymin>5</ymin><xmax>20</xmax><ymax>16</ymax></bndbox></object>
</annotation>"""


def voc_fixture(tmp_path: Path, xml: dict[str, str] | None = None) -> Path:
    """VOC2007-like folder with images x (20x16, size in XML) and y (24x18, no <size>)."""
    root = tmp_path / "VOC2007"
    write_image(root / "JPEGImages" / "x.jpg", 20, 16)
    write_image(root / "JPEGImages" / "y.jpg", 24, 18)
    xml = xml or {"x": VOC_XML.format(name="x", size="<size><width>20</width><height>16</height></size>"),
                  "y": VOC_XML.format(name="y", size="")}
    (root / "Annotations").mkdir()
    for name, text in xml.items():
        (root / "Annotations" / f"{name}.xml").write_text(text)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("x\ny\n")
    return root


def test_voc_records(tmp_path):
    x, y = load_voc_records(voc_fixture(tmp_path), "train")
    assert (x.image_id, y.image_id) == (0, 1)
    assert (x.width, x.height, y.width, y.height) == (20, 16, 24, 18)  # y's size is read from the image
    np.testing.assert_array_equal(x.boxes, [[0, 1, 10, 12], [4, 4, 20, 16]])  # 1-based inclusive -> 0-based
    assert x.labels.tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert x.ignore.tolist() == [False, True]


# ---------------------------------------------------------------- validation errors

def coco_with(tmp_path, bbox=(2, 3, 10, 5), category_id=7, drop_image=False, text=None):
    images_dir, json_path = coco_fixture(tmp_path, [{"id": 41, "image_id": 5, "category_id": category_id,
                                                     "bbox": list(bbox), "iscrowd": 0}])
    if drop_image:
        (images_dir / "a.png").unlink()
    if text is not None:
        json_path.write_text(text)
    return lambda **kw: load_coco_records(images_dir, json_path, **kw)


def voc_with(tmp_path, bad_xml: str):
    root = voc_fixture(tmp_path, {"x": bad_xml, "y": VOC_XML.format(name="y", size="")})
    return lambda **kw: load_voc_records(root, "train", **kw)


@pytest.mark.parametrize("case, expected", [
    ("missing image", ["instances.json", "a.png"]),
    ("malformed json", ["instances.json"]),
    ("negative-width box", ["instances.json", "annotation id 41", "negative width or height"]),
    ("box outside image", ["instances.json", "annotation id 41", "outside"]),
    ("unknown category", ["instances.json", "annotation id 41", "category_id 99"]),
    ("malformed xml", ["x.xml"]),
    ("unknown class", ["x.xml", "object 0", "unicorn"]),
    ("voc box outside image", ["x.xml", "object 1", "outside"]),
])
def test_invalid_data_raises_naming_file_and_object(tmp_path, case, expected):
    load = {
        "missing image": lambda: coco_with(tmp_path, drop_image=True),
        "malformed json": lambda: coco_with(tmp_path, text='{"images": [}'),
        "negative-width box": lambda: coco_with(tmp_path, bbox=(2, 3, -1, 5)),
        "box outside image": lambda: coco_with(tmp_path, bbox=(15, 3, 8, 5)),
        "unknown category": lambda: coco_with(tmp_path, category_id=99),
        "malformed xml": lambda: voc_with(tmp_path, "<annotation><object></annotation>"),
        "unknown class": lambda: voc_with(tmp_path, VOC_XML.format(name="x", size="").replace("dog", "unicorn")),
        "voc box outside image": lambda: voc_with(tmp_path, VOC_XML.format(name="x", size="").replace(
            "<xmax>20</xmax>", "<xmax>40</xmax>")),
    }[case]()
    with pytest.raises(DatasetError) as error:
        load()
    assert all(text in str(error.value) for text in expected), str(error.value)


def test_skip_invalid_skips_and_counts(tmp_path, caplog):
    images_dir, json_path = coco_fixture(tmp_path, [
        {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 7, "bbox": [2, 3, -1, 5], "iscrowd": 0},  # negative width
        {"id": 3, "image_id": 5, "category_id": 99, "bbox": [2, 3, 4, 5], "iscrowd": 0},  # unknown category
        {"id": 4, "image_id": 9, "category_id": 3, "bbox": [1, 1, 4, 4], "iscrowd": 0},  # on the missing image
    ])
    (images_dir / "b.png").unlink()
    with caplog.at_level(logging.WARNING, logger="detection.datasets"):
        records, _, _ = load_coco_records(images_dir, json_path, skip_invalid=True)
    assert [(r.image_id, len(r.boxes)) for r in records] == [(5, 1)]
    assert "skipped 3 invalid item(s)" in caplog.text

    load_voc = voc_with(tmp_path, VOC_XML.format(name="x", size="").replace("dog", "unicorn"))
    (tmp_path / "VOC2007" / "JPEGImages" / "y.jpg").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detection.datasets"):
        records = load_voc(skip_invalid=True)
    assert [(r.image_id, r.labels.tolist()) for r in records] == [(0, [VOC_CLASSES.index("person") + 1])]
    assert "skipped 2 invalid item(s)" in caplog.text


def test_read_image_names_unreadable_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        read_image(tmp_path / "broken.jpg")


# ---------------------------------------------------------------- dataset + transforms

def test_dataset_item_drops_ignored_boxes(tmp_path):
    records, _, _ = load_coco_records(*coco_fixture(tmp_path))
    dataset = DetectionDataset(records)
    image, target = dataset[0]
    assert image.shape == (3, 16, 20) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, 90 / 255))
    assert target["boxes"].tolist() == [[2, 3, 12, 8]] and target["labels"].tolist() == [2]
    assert target["image_id"] == 5 and target["orig_size"] == (16, 20)
    assert dataset.aspect_ratios() == [20 / 16, 10 / 12]
    images, targets = collate([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2 and targets[1]["boxes"].shape == (0, 4)
    wrong_size = DetectionDataset([replace(records[0], width=21)])
    with pytest.raises(DatasetError, match=r"a.png: image is 20x16 \(WxH\) but the annotation of image id 5 says 21x16"):
        wrong_size[0]


@pytest.mark.parametrize("train, min_size, max_size, flip, size_hw, box", [
    (False, 100, 1000, 0.5, (100, 200), [20, 10, 60, 50]),  # shortest side 50 -> 100: scale 2
    (True, (100,), 1000, 1.0, (100, 200), [140, 10, 180, 50]),  # and flipped: x -> 200 - x
    (False, 100, 150, 0.5, (75, 150), [15, 7.5, 45, 37.5]),  # longest side capped: scale 1.5
    (False, 50, 1000, 0.5, (50, 100), [10, 5, 30, 25]),  # no upscaling towards max_size
    (False, (40, 60, 50), 1000, 0.5, (60, 120), [12, 6, 36, 30]),  # eval uses the largest scale
])
def test_transforms_move_boxes_with_the_image(train, min_size, max_size, flip, size_hw, box):
    transform = build_det_transforms(train, min_size, max_size, flip_prob=flip)
    image = np.zeros((50, 100, 3), np.uint8)
    out = transform(image=image, bboxes=np.array([[10, 5, 30, 25]], np.float32), labels=np.array([4]))
    assert out["image"].shape[:2] == size_hw
    np.testing.assert_allclose(out["bboxes"], [box], atol=1e-4)
    assert list(out["labels"]) == [4]


def test_train_transforms_are_multiscale():
    transform = build_det_transforms(True, (40, 50, 60), 1000)
    shorts = {transform(image=np.zeros((50, 100, 3), np.uint8), bboxes=np.zeros((0, 4)), labels=[])["image"].shape[0]
              for _ in range(30)}
    assert shorts == {40, 50, 60}


# ---------------------------------------------------------------- synthetic data

def test_synthetic_is_deterministic_idempotent_and_valid(tmp_path):
    kwargs = {"num_train": 6, "num_val": 3, "image_size": (48, 64), "seed": 3}
    a, b = generate_shapes_dataset(tmp_path / "a", **kwargs), generate_shapes_dataset(tmp_path / "b", **kwargs)
    for part in ["annotations/instances_train.json", "annotations/instances_val.json", "train/000006.png"]:
        assert (a / part).read_bytes() == (b / part).read_bytes()
    stamp = (a / "train" / "000001.png").stat().st_mtime_ns
    assert generate_shapes_dataset(tmp_path / "a", **kwargs) == a
    assert (a / "train" / "000001.png").stat().st_mtime_ns == stamp  # the marker matched: nothing rewritten
    generate_shapes_dataset(tmp_path / "a", **{**kwargs, "num_train": 2})  # new arguments: regenerated
    assert sorted(p.name for p in (a / "train").iterdir()) == ["000001.png", "000002.png"]

    records, names, cat_ids = load_coco_records(b / "train", b / "annotations" / "instances_train.json")
    assert names == ["circle", "square", "triangle"] and cat_ids == [1, 2, 3] and len(records) == 6
    assert all((r.width, r.height) == (64, 48) and 1 <= len(r.boxes) <= 3 for r in records)
    for record in records:  # boxes are tight: the shape's single colour spans exactly the box
        image = read_image(record.path)
        for x1, y1, x2, y2 in record.boxes.astype(int).tolist():
            colours, counts = np.unique(image[y1:y2, x1:x2].reshape(-1, 3), axis=0, return_counts=True)
            shape = np.all(image == colours[counts.argmax()], axis=-1).astype(np.uint8)
            shape[:max(y1 - 1, 0)], shape[y2 + 1:], shape[:, :max(x1 - 1, 0)], shape[:, x2 + 1:] = 0, 0, 0, 0
            assert cv2.boundingRect(shape) == (x1, y1, x2 - x1, y2 - y1)


def test_synthetic_through_dataset_and_loader(tmp_path):
    root = generate_shapes_dataset(tmp_path, num_train=8, num_val=0, image_size=64)
    records, _, _ = load_coco_records(root / "train", root / "annotations" / "instances_train.json")
    dataset = DetectionDataset(records, build_det_transforms(True, (32, 48), 96))
    sampler = GroupedBatchSampler(RandomSampler(dataset), aspect_ratio_groups(dataset.aspect_ratios()), 4)
    images, targets = next(iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)))
    assert len(images) == 4 and all(img.shape[1] in (32, 48) and img.shape[1] == img.shape[2] for img in images)
    for img, target in zip(images, targets):
        boxes = target["boxes"]
        assert len(boxes) >= 1 and (boxes[:, 2:] <= img.shape[1]).all() and (boxes[:, :2] >= 0).all()


def test_each_sample_draws_its_own_augmentation_in_any_worker(tmp_path):
    """The training path (engine.sampling): a sample's augmentation depends on its seed only, so two workers
    never repeat each other's draws and a worker count never changes what a sample looks like."""
    root = generate_shapes_dataset(tmp_path, num_train=12, num_val=0, image_size=32)
    records, _, _ = load_coco_records(root / "train", root / "annotations" / "instances_train.json")
    dataset = SeededDataset(DetectionDataset(records, build_det_transforms(True, list(range(8, 48, 4)), 96)))
    keys = [(0, seed) for seed in range(8)]  # one image, eight seeds
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate, sampler=keys)
    sizes = [images[0].shape[1] for images, _ in loader]  # worker 0 serves even batches, worker 1 odd ones
    assert sizes[0::2] != sizes[1::2] and len(set(sizes)) > 2
    assert sizes == [dataset[key][0].shape[1] for key in keys]  # in the main process: the same draws


# ---------------------------------------------------------------- grouped batching

@pytest.mark.parametrize("make_sampler", [
    lambda n: SequentialSampler(range(n)),
    lambda n: RandomSampler(range(n), generator=torch.Generator().manual_seed(0)),
    lambda n: DistributedSampler(range(n), num_replicas=2, rank=1, shuffle=True, seed=0),
])
def test_grouped_batches_are_homogeneous(make_sampler):
    ratios = [1.5, 0.5, 0.7, 1.0, 1.3, 0.6, 2.0, 0.9, 1.1, 0.4, 0.8]
    groups = aspect_ratio_groups(ratios)
    assert groups[:4] == [1, 0, 0, 1]
    inner = make_sampler(len(ratios))
    batch_sampler = GroupedBatchSampler(inner, groups, batch_size=2)
    batch_sampler.set_epoch(1)
    batches = list(batch_sampler)
    assert len(batches) == len(batch_sampler) == len(inner) // 2
    assert all(len(b) == 2 and len({groups[i] for i in b}) == 1 for b in batches)
    assert {i for b in batches for i in b} <= set(inner)


# ---------------------------------------------------------------- the shared real data (optional)

@pytest.mark.skipif(not (SHARED_DATA / "coco128").is_dir(), reason=f"{SHARED_DATA / 'coco128'} not present")
def test_coco128_train96():
    root = SHARED_DATA / "coco128"
    records, names, cat_ids = load_coco_records(root / "train2017", root / "annotations" / "instances_train96.json")
    assert len(records) == 96 and len(names) == 80 and cat_ids[0] == 1 and cat_ids[-1] == 90
    assert sum(len(r.boxes) for r in records) == 719 and any(r.ignore.any() for r in records)
    assert all(r.labels.min(initial=1) >= 1 and r.labels.max(initial=1) <= 80 for r in records)


@pytest.mark.skipif(not (SHARED_DATA / "coco128-voc").is_dir(), reason=f"{SHARED_DATA / 'coco128-voc'} not present")
def test_coco128_voc_train():
    records = load_voc_records(SHARED_DATA / "coco128-voc" / "VOCdevkit" / "VOC2012", "train")
    assert len(records) == 73 and all(len(r.boxes) >= 1 for r in records)
    assert any(r.ignore.any() for r in records)
    assert all(1 <= r.labels.min() and r.labels.max() <= len(VOC_CLASSES) for r in records)
