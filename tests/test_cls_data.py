"""Classification data: datasets (Tiny-ImageNet, ImageFolder), transforms, top-k metrics."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classification.datasets import build_cls_dataset
from classification.metrics import AccuracyMeter, average_crops, topk_correct
from classification.synthetic import generate_imagefolder
from classification.transforms import PCALighting, build_cls_transforms
from datafiles.images import DatasetError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_REAL = SHARED_DATA / "tiny-imagenet-200"
WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted, like the official wnids.txt


def _save(path: Path, mode: str = "RGB", size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), 128).save(path)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """Handmade Tiny-ImageNet layout: 3 classes x 2 train images, 3 val images (one grayscale)."""
    root = tmp_path / "tiny"
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for wnid in WNIDS:
        for i in range(2):
            _save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t8\t8\n")
    _save(root / "val" / "images" / "val_0.JPEG", mode="L")
    _save(root / "val" / "images" / "val_1.JPEG")
    _save(root / "val" / "images" / "val_2.JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn03\t0\t0\t8\t8\nval_1.JPEG\tn01\t1\t1\t9\t9\nval_2.JPEG\tn02\t2\t2\t7\t7\n"
    )
    return root


# --- datasets -------------------------------------------------------------------------------


def test_tiny_imagenet_fixture(tiny_root: Path) -> None:
    tf = build_cls_transforms(False, image_size=16, recipe="small")
    train = build_cls_dataset("tiny-imagenet", tiny_root, "train", tf)
    val = build_cls_dataset("tiny-imagenet", tiny_root, "val", tf)
    assert train.classes == val.classes == ["n01", "n02", "n03"]
    assert len(train) == 6 and len(val) == 3  # _boxes.txt files are not samples
    assert sorted(label for _, label in train.samples) == [0, 0, 1, 1, 2, 2]
    assert [label for _, label in (val[i] for i in range(3))] == [2, 0, 1]
    image, _ = val[0]  # grayscale JPEG comes out as 3-channel RGB
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32


def test_tiny_imagenet_classes_from_train_folders(tiny_root: Path) -> None:
    (tiny_root / "wnids.txt").unlink()
    val = build_cls_dataset("tiny-imagenet", tiny_root, "val", None)
    assert val.classes == ["n01", "n02", "n03"]
    assert val[0][0].mode == "RGB"


def test_tiny_imagenet_unknown_wnid_names_file_and_line(tiny_root: Path) -> None:
    ann = tiny_root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_1.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations\.txt:4: unknown wnid 'n99'"):
        build_cls_dataset("tiny-imagenet", tiny_root, "val", None)


def test_tiny_imagenet_missing_val_image(tiny_root: Path) -> None:
    (tiny_root / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"val_annotations\.txt:3: .*val_2\.JPEG"):
        build_cls_dataset("tiny-imagenet", tiny_root, "val", None)


def test_decode_error_names_file(tiny_root: Path) -> None:
    bad = tiny_root / "val" / "images" / "val_1.JPEG"
    bad.write_bytes(b"not a jpeg")
    val = build_cls_dataset("tiny-imagenet", tiny_root, "val", None)
    with pytest.raises(DatasetError, match="val_1.JPEG"):
        val[1]


def test_missing_folders_and_bad_format(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "val"))):
        build_cls_dataset("imagefolder", tmp_path, "val", None)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train"))):
        build_cls_dataset("tiny-imagenet", tmp_path, "val", None)  # no wnids.txt: classes from train/
    (tmp_path / "wnids.txt").write_text("n01\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "val" / "images"))):
        build_cls_dataset("tiny-imagenet", tmp_path, "val", None)
    with pytest.raises(ValueError, match="imagefolder, tiny-imagenet"):
        build_cls_dataset("coco", tmp_path, "train", None)
    with pytest.raises(ValueError, match="'train' and 'val'"):
        build_cls_dataset("tiny-imagenet", tmp_path, "test", None)


@pytest.mark.skipif(not TINY_REAL.is_dir(), reason=f"real Tiny-ImageNet subset not found at {TINY_REAL}")
def test_tiny_imagenet_real_subset() -> None:
    tf = build_cls_transforms(False, image_size=64, recipe="small")
    train = build_cls_dataset("tiny-imagenet", TINY_REAL, "train", tf)
    val = build_cls_dataset("tiny-imagenet", TINY_REAL, "val", tf)
    assert len(train.classes) == 200 and train.classes == val.classes == sorted(train.classes)
    assert (len(train), len(val)) == (20_000, 2_000)
    assert np.bincount(val.targets, minlength=200).tolist() == [10] * 200
    for dataset in (train, val):
        image, label = dataset[len(dataset) // 2]
        assert image.shape == (3, 64, 64) and 0 <= label < 200
    # The label of a train image is its wnid folder.
    path, label = train.samples[0]
    assert Path(path).parts[-3] == train.classes[label]


def test_imagefolder_on_generated_data(tmp_path: Path) -> None:
    root = generate_imagefolder(
        tmp_path / "synth", num_classes=3, train_per_class=4, val_per_class=2, image_size=32
    )
    tf = build_cls_transforms(False, image_size=32, recipe="small")
    train = build_cls_dataset("imagefolder", root, "train", tf)
    val = build_cls_dataset("imagefolder", root, "val", tf)
    assert train.classes == val.classes and len(train.classes) == 3
    assert (len(train), len(val)) == (12, 6)
    image, label = val[5]
    assert image.shape == (3, 32, 32) and label == 2


# --- synthetic data -------------------------------------------------------------------------


def test_synthetic_deterministic_idempotent_and_separable(tmp_path: Path) -> None:
    kw = dict(num_classes=4, train_per_class=6, val_per_class=4, image_size=32)
    a, b = generate_imagefolder(tmp_path / "a", **kw), generate_imagefolder(tmp_path / "b", **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 40
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert json.loads((a / "DONE.json").read_text())["num_classes"] == 4

    first = a / files[0]
    mtime = first.stat().st_mtime_ns
    generate_imagefolder(a, **kw)
    assert first.stat().st_mtime_ns == mtime  # marker matched: nothing rewritten
    generate_imagefolder(a, **{**kw, "num_classes": 2})
    assert len(list((a / "train").iterdir())) == 2  # other params: regenerated

    # Separable: nearest class-mean colour of the shape-coloured pixels classifies val perfectly.
    def feature(path: Path) -> np.ndarray:
        x = np.asarray(Image.open(path), dtype=np.float32) / 255
        return x[x.std(axis=2) > 0.15].mean(axis=0)  # saturated (shape) pixels only

    means = np.stack([np.mean([feature(p) for p in sorted(d.iterdir())], axis=0)
                      for d in sorted((b / "train").iterdir())])
    for label, d in enumerate(sorted((b / "val").iterdir())):
        for p in d.iterdir():
            assert np.argmin(((means - feature(p)) ** 2).sum(axis=1)) == label


# --- transforms -----------------------------------------------------------------------------


@pytest.fixture
def photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "train, recipe, size",
    [
        (True, "paper", 224),
        (False, "paper", 224),
        (True, "paper", 64),
        (True, "small", 64),
        (False, "small", 56),
    ],
)
def test_transform_shapes_and_range(photo: Image.Image, train: bool, recipe: str, size: int) -> None:
    out = build_cls_transforms(train, image_size=size, recipe=recipe)(photo)
    assert type(out) is torch.Tensor and out.dtype == torch.float32
    assert out.shape == (3, size, size)
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_paper_eval_is_deterministic(photo: Image.Image) -> None:
    out = build_cls_transforms(False, image_size=112, recipe="paper")(photo)  # shorter side -> 128
    assert out.shape == (3, 112, 112)
    assert torch.equal(out, build_cls_transforms(False, image_size=112, recipe="paper")(photo))


def test_ten_crop(photo: Image.Image) -> None:
    out = build_cls_transforms(False, image_size=96, recipe="paper", ten_crop=True)(photo)
    assert out.shape == (10, 3, 96, 96) and 0.0 <= out.min() and out.max() <= 1.0
    assert torch.equal(out[9], out[4].flip(-1))  # centre crop and its mirror
    batch = torch.utils.data.default_collate([out, out])
    assert batch.shape == (2, 10, 3, 96, 96)
    with pytest.raises(ValueError, match="ten_crop"):
        build_cls_transforms(True, ten_crop=True)
    with pytest.raises(ValueError, match="paper, small"):
        build_cls_transforms(False, recipe="imagenet")


def test_pca_lighting_shifts_every_pixel_by_one_rgb_offset() -> None:
    torch.manual_seed(0)
    image = torch.full((3, 8, 8), 0.5)
    out = PCALighting(std=0.1)(image)
    shift = out - image
    assert shift.abs().max() > 0
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift))


# --- metrics --------------------------------------------------------------------------------


def test_topk_correct_hand_computed() -> None:
    logits = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # target 0 ranked 1st
            [1.0, 9.0, 8.0, 3.0, 4.0, 5.0],  # target 2 ranked 2nd
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 4 ranked 5th
        ]
    )
    targets = torch.tensor([0, 2, 4])
    assert topk_correct(logits, targets) == {1: 1, 5: 3}
    assert topk_correct(logits, targets, ks=(1, 2, 10)) == {1: 1, 2: 2, 10: 3}

    meter = AccuracyMeter()
    meter.update(logits, targets)
    meter.update(logits[:1], targets[:1])
    assert meter.total == 4 and meter.correct == {1: 2, 5: 4}
    assert meter.compute() == pytest.approx({"top1": 50.0, "top5": 100.0})


def test_ten_crop_averaging() -> None:
    # Sample 0: crop A is sure of class 0, crop B mildly prefers class 1 -> class 0 on average.
    # Sample 1: both crops rank the target (class 1) second.
    logits = torch.tensor([[[5.0, 0.0, -5.0], [0.0, 1.0, -5.0]], [[0.0, 1.0, 3.0], [0.0, 1.0, 3.0]]])
    probs = average_crops(logits)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    softmax_0 = [math.exp(v[0]) / sum(map(math.exp, v)) for v in ([5, 0, -5], [0, 1, -5])]
    assert probs[0, 0].item() == pytest.approx(sum(softmax_0) / 2)
    assert topk_correct(logits, torch.tensor([0, 1]), ks=(1, 2)) == {1: 1, 2: 2}
    assert torch.equal(average_crops(logits[:, 0]), logits[:, 0])


def test_meter_without_samples_raises() -> None:
    with pytest.raises(RuntimeError, match="before any sample"):
        AccuracyMeter().compute()
