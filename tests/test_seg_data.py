"""Segmentation data: VOC / COCO loading, file-naming errors, joint transforms, synthetic set."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segmentation.datasets import (COCO_TO_VOC, CocoSemantic, DatasetError, SegmentationDataset, VOCSegmentation,
                                   load_voc_segmentation, read_mask)
from segmentation.palette import VOC_SEG_CLASSES, VOID, colorize, overlay, save_palette_png, voc_palette
from segmentation.synthetic import SHAPES_SEG_CLASSES, generate_shapes_segmentation
from segmentation.transforms import build_seg_transforms

# pycocotools' RLE decoding trips a numpy 2 DeprecationWarning inside the library, not in our code
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_VOC = SHARED_DATA / "coco128-voc" / "VOCdevkit" / "VOC2012"
SHARED_COCO = SHARED_DATA / "coco128"


def write_voc(root: Path, pairs: dict, split: str = "train") -> Path:
    """A VOC folder with `pairs` = {stem: (image RGB uint8, mask)} all in one split."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for stem, (image, mask) in pairs.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.jpg")
        save_palette_png(root / "SegmentationClass" / f"{stem}.png", mask)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(pairs) + "\n")
    return root


def pair(height: int = 10, width: int = 12, labels=(0, 3, VOID), mask_shape=None):
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.choice(np.array(labels, dtype=np.uint8), size=mask_shape or (height, width))
    return image, mask


def test_voc_palette_and_palette_png(tmp_path):
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[1].tolist() == [128, 0, 0] and palette[15].tolist() == [192, 128, 128]
    mask = np.array([[0, 1], [15, VOID]], dtype=np.uint8)
    save_palette_png(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as written:
        assert written.mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    assert colorize(mask)[1, 0].tolist() == [192, 128, 128]
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    blended = overlay(image, mask, alpha=0.5)
    assert blended[1, 1].tolist() == [100, 100, 100]  # void left uncoloured
    assert blended[0, 1].tolist() == [114, 50, 50]


def test_voc_loading(tmp_path):
    pairs = {"a": pair(), "b": pair(8, 6)}
    ds = VOCSegmentation(write_voc(tmp_path, pairs), "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.class_names == list(VOC_SEG_CLASSES)
    for (image, mask), (_, expected) in zip(ds, pairs.values()):
        assert image.dtype == torch.float32 and image.shape == (3, *expected.shape)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert mask.dtype == torch.int64
        np.testing.assert_array_equal(mask.numpy(), expected)  # palette indices, not colours
    ds.validate()


def test_png_images_are_found_by_stem(tmp_path):
    root = write_voc(tmp_path, {"a": pair()})
    (root / "JPEGImages" / "a.jpg").rename(root / "JPEGImages" / "a.png")
    samples = load_voc_segmentation(root, "train")
    assert samples[0][0].suffix == ".png"
    image, _ = SegmentationDataset(samples, num_classes=4)[0]
    assert image.shape == (3, 10, 12)


def test_size_mismatch_names_both_files(tmp_path):
    root = write_voc(tmp_path, {"a": pair(10, 12, mask_shape=(10, 11))})
    with pytest.raises(DatasetError) as error:
        VOCSegmentation(root, "train")[0]
    message = str(error.value)
    assert str(root / "JPEGImages" / "a.jpg") in message and str(root / "SegmentationClass" / "a.png") in message
    assert "12x10" in message and "11x10" in message


def test_bad_label_values_name_the_file(tmp_path):
    root = write_voc(tmp_path, {"ok": pair(), "bad": pair(labels=(0, 30, 254))})
    ds = VOCSegmentation(root, "train")
    with pytest.raises(DatasetError, match=r"bad\.png.*\[30, 254\]"):
        ds.validate()


def test_missing_split_file_lists_available(tmp_path):
    root = write_voc(tmp_path, {"a": pair()}, split="val")
    with pytest.raises(DatasetError, match=r"Segmentation/train\.txt.*\['val\.txt'\]"):
        load_voc_segmentation(root, "train")


def test_missing_image_and_mask_are_named(tmp_path):
    root = write_voc(tmp_path, {"a": pair(), "b": pair()})
    (root / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"SegmentationClass/b\.png"):
        load_voc_segmentation(root, "train")
    (root / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"JPEGImages/a\.jpg"):
        load_voc_segmentation(root, "train")


def test_train_transform_keeps_integer_labels():
    image, mask = pair(20, 28, labels=(0, 1, 2))
    transform = build_seg_transforms(True, 24)
    seen = set()
    for seed in range(20):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (24, 24, 3) and out["mask"].shape == (24, 24)
        assert out["mask"].dtype == np.uint8
        seen |= set(np.unique(out["mask"]).tolist())
    assert seen == {0, 1, 2, VOID}  # nearest-neighbour labels, void only from padding


def test_train_transform_keeps_image_and_mask_aligned():
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    image[4:20, 2:14] = 255  # off-centre, so a flip of only one of them would show
    mask[4:20, 2:14] = 1
    transform = build_seg_transforms(True, 28)
    for seed in range(20):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        bright = np.argwhere(out["image"][..., 0] > 127)
        labelled = np.argwhere(out["mask"] == 1)
        assert (len(bright) == 0) == (len(labelled) == 0)
        if len(labelled):
            assert np.abs(bright.mean(0) - labelled.mean(0)).max() < 1.5


def test_eval_transform_is_full_resolution_or_base_size():
    image, mask = pair(20, 30)
    out = build_seg_transforms(False, 16)(image=image, mask=mask)
    np.testing.assert_array_equal(out["mask"], mask)
    out = build_seg_transforms(False, 16, base_size=10)(image=image, mask=mask)
    assert out["image"].shape == (10, 15, 3) and out["mask"].shape == (10, 15)


def test_dataset_with_train_transform_batches(tmp_path):
    ds = VOCSegmentation(write_voc(tmp_path, {"a": pair(), "b": pair(8, 6)}), "train",
                         transform=build_seg_transforms(True, 16))
    images, masks = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16) and masks.dtype == torch.int64


def test_synthetic_is_deterministic_and_idempotent(tmp_path):
    params = dict(num_train=4, num_val=2, image_size=32, seed=3)
    first = generate_shapes_segmentation(tmp_path / "one", **params)
    second = generate_shapes_segmentation(tmp_path / "two", **params)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)

    stamps = {f: (first / f).stat().st_mtime_ns for f in files}
    assert generate_shapes_segmentation(tmp_path / "one", **params) == first
    assert stamps == {f: (first / f).stat().st_mtime_ns for f in files}
    with pytest.raises(DatasetError, match="DONE.json"):
        generate_shapes_segmentation(tmp_path / "one", **{**params, "seed": 4})

    ds = VOCSegmentation(first, "train", num_classes=len(SHAPES_SEG_CLASSES), class_names=SHAPES_SEG_CLASSES)
    assert len(ds) == 4 and len(VOCSegmentation(first, "val", num_classes=4)) == 2
    ds.validate()
    labels = set().union(*(np.unique(ds.load_sample(i)[1]).tolist() for i in range(len(ds))))
    assert VOID in labels and 0 in labels and labels - {0, VOID}  # void borders around objects


def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def tiny_coco(tmp_path):
    """One 24x16 image: airplane, a smaller person on top, a person crowd, an umbrella."""
    Image.fromarray(np.zeros((16, 24, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    crowd = np.zeros((16, 24), dtype=np.uint8)
    crowd[12:15, 18:22] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    anns = [
        {"category_id": 5, "segmentation": rect(2, 2, 14, 12), "area": 120.0, "iscrowd": 0},
        {"category_id": 1, "segmentation": rect(10, 4, 18, 10), "area": 48.0, "iscrowd": 0},
        {"category_id": 1, "segmentation": crowd_rle, "area": 12.0, "iscrowd": 1},
        {"category_id": 28, "segmentation": rect(0, 0, 4, 4), "area": 16.0, "iscrowd": 0},
    ]
    for i, ann in enumerate(anns):
        ann.update(id=i + 1, image_id=7, bbox=[0, 0, 1, 1])
    data = {
        "images": [{"id": 7, "file_name": "img.png", "width": 24, "height": 16}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 28, "name": "umbrella"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path


def test_coco_to_voc_semantic(tiny_coco):
    ds = CocoSemantic(tiny_coco, tiny_coco / "ann.json", class_mapping=COCO_TO_VOC, class_names=VOC_SEG_CLASSES)
    expected = np.zeros((16, 24), dtype=np.int64)
    expected[2:12, 2:14] = VOC_SEG_CLASSES.index("aeroplane")
    expected[4:10, 10:18] = VOC_SEG_CLASSES.index("person")  # smaller, drawn last
    expected[12:15, 18:22] = VOID  # crowd
    # the umbrella is not a VOC class: it is background and does not erase the airplane under it
    image, mask = pickle.loads(pickle.dumps(ds))[0]  # picklable for DataLoader workers
    assert ds.num_classes == 21 and image.shape == (3, 16, 24)
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_coco_default_mapping_and_size_check(tiny_coco):
    ds = CocoSemantic(tiny_coco, tiny_coco / "ann.json")
    assert ds.class_names == ["background", "person", "airplane", "umbrella"]
    _, mask = ds[0]
    assert mask[1, 1] == 3 and mask[5, 12] == 1 and mask[3, 3] == 3
    Image.fromarray(np.zeros((16, 20, 3), dtype=np.uint8)).save(tiny_coco / "img.png")
    with pytest.raises(DatasetError, match=r"img\.png.*20x16.*ann\.json \(image id 7\).*24x16"):
        ds.validate()


@pytest.mark.skipif(not SHARED_VOC.is_dir(), reason=f"shared dataset not found at {SHARED_VOC}")
def test_shared_coco128_voc():
    ds = VOCSegmentation(SHARED_VOC, "train")
    assert len(ds) > 0
    for index in range(3):
        image, mask = ds.load_sample(index)
        assert image.shape[:2] == mask.shape
        assert set(np.unique(mask).tolist()) <= set(range(21)) | {VOID}
    if not SHARED_COCO.is_dir():
        pytest.skip(f"shared dataset not found at {SHARED_COCO}")
    coco = CocoSemantic(SHARED_COCO / "train2017", SHARED_COCO / "annotations" / "instances_train2017.json",
                        class_mapping=COCO_TO_VOC)
    rendered = {path.stem: source for path, source in coco.samples}
    for _, mask_path in ds.samples[:5]:  # our COCO rendering reproduces the shared VOC-format masks
        np.testing.assert_array_equal(rendered[mask_path.stem](), read_mask(mask_path))
