"""tools/train_seg.py, test_seg.py and visualize_seg.py end to end, on tiny crops so CPU runs take seconds."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # the tools import each other as torchvision's references do

import test_seg  # noqa: E402
import train_seg  # noqa: E402
import visualize_seg  # noqa: E402

from segmentation.synthetic import SHAPES_SEG_CLASSES, generate_shapes_segmentation  # noqa: E402

COCO128_VOC = ROOT.parent / "shared" / "data" / "coco128-voc" / "VOCdevkit" / "VOC2012"
SHAPES = "data.synthetic.enabled=true"  # the generated demo set in data.root
TINY = ["data.num_workers=0", "data.crop_size=48", "train.batch_size=2", "data.val_limit=3", "train.log_every=1"]



def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_segmentation(tmp_path_factory.mktemp("data") / "shapes_seg")


@pytest.fixture(scope="module")
def default_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The default config, cut to 2 iterations."""
    run_dir = tmp_path_factory.mktemp("seg_default")
    metrics = train_seg.main(["train.iters=2", SHAPES, f"data.root={shapes_root}", f"output_dir={run_dir}", *TINY])
    return run_dir, metrics


def test_default_config_runs_and_writes_outputs(default_run: tuple[Path, dict]) -> None:
    run_dir, metrics = default_run
    for name in ("config.yaml", "last.pth", "metrics.json", "history.jsonl"):
        assert (run_dir / name).is_file(), name
    written = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= written["mIoU"] <= 1.0 and written["mIoU"] == pytest.approx(metrics["mIoU"])
    assert set(written["IoU_per_class"]) == set(SHAPES_SEG_CLASSES)
    assert torch.load(run_dir / "last.pth", weights_only=True)["iteration"] == 2


@pytest.mark.skipif(not COCO128_VOC.is_dir(), reason=f"shared coco128-voc data not found at {COCO128_VOC}")
def test_coco128_voc_loss_goes_down(tmp_path: Path) -> None:
    config = ROOT / "configs" / "seg" / "coco128_voc.yaml"
    metrics = train_seg.main(["--config", str(config), f"data.root={COCO128_VOC}",
                              "train.iters=6", "train.warmup_iters=0", "data.crop_size=128", "train.batch_size=2",
                              "data.val_limit=2", "data.num_workers=0", "train.log_every=1", f"output_dir={tmp_path}"])
    losses = [record["train/loss"] for record in history(tmp_path) if "train/loss" in record]
    assert len(losses) == 6
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert len(metrics["IoU_per_class"]) == 21 and (tmp_path / "metrics.json").is_file()


def test_overfits_four_images(tmp_path: Path) -> None:
    """Four 48-px images, no augmentation, evaluated on themselves: the model must be able to memorise them.

    Seed 5 gives every class > 150 labelled pixels, so no IoU hinges on a handful of pixels; the split
    lists the images 10 times so that an epoch (and its checkpoint) spans 10 iterations, not one.
    """
    root = generate_shapes_segmentation(tmp_path / "four", num_train=4, num_val=0, image_size=48, seed=5)
    stems = (root / "ImageSets" / "Segmentation" / "train.txt").read_text()
    (root / "ImageSets" / "Segmentation" / "train_x10.txt").write_text(stems * 10)
    metrics = train_seg.main([
        f"data.root={root}", "data.synthetic.enabled=false", f"data.class_names={list(SHAPES_SEG_CLASSES)}",
        "data.train.split=train_x10", "data.val.split=train", "data.crop_size=48", "data.scale_range=[1.0,1.0]",
        "data.flip_prob=0", "data.num_workers=0", "train.batch_size=4", "train.iters=60", "train.lr=0.05",
        "train.warmup_iters=5", "train.weight_decay=0", f"output_dir={tmp_path / 'run'}",
    ])
    assert metrics["mIoU"] > 0.6, metrics


def test_resume_continues_from_saved_iteration(default_run: tuple[Path, dict], shapes_root: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(default_run[0], run_dir)
    train_seg.main(["--resume", "train.iters=4", SHAPES, f"data.root={shapes_root}", f"output_dir={run_dir}", *TINY])
    assert "at iteration 2 (0 epochs and 2 batches done)" in capsys.readouterr().out
    iterations = [record["iteration"] for record in history(run_dir) if "train/loss" in record]
    assert iterations == [1, 2, 3, 4]
    assert torch.load(run_dir / "last.pth", weights_only=True)["iteration"] == 4


def test_config_mistakes_fail_clearly(shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train_seg.main(["train.lrr=0.1", f"output_dir={tmp_path}"])
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model.num_classes=21 but the data has 4 classes"):
        train_seg.main(["model.num_classes=21", SHAPES, f"data.root={shapes_root}", f"output_dir={tmp_path}"])


def test_test_and_visualize_tools_on_checkpoint(default_run: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir = default_run[0]
    common = ["--config", str(run_dir / "config.yaml"), "--checkpoint", str(run_dir / "last.pth")]
    metrics = test_seg.main([*common, "eval.scales=[0.75,1.0]", "eval.flip=true"])
    written = json.loads((run_dir / "test_metrics.json").read_text())
    assert written["mIoU"] == pytest.approx(metrics["mIoU"]) and "pixel_acc" in written

    paths = visualize_seg.main([*common, "--out", str(tmp_path / "vis"), "--num", "2", "--gt"])
    assert len(paths) == 2
    with Image.open(paths[0]) as picture:
        assert picture.size == (3 * 96 + 2 * visualize_seg.GAP, 96)
