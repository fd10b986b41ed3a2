"""tools/train_cls.py end to end: it learns, writes its outputs, exports a loadable backbone, resumes."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from backbones import build_backbone, load_backbone_weights
from classification.models import build_classifier
from classification.synthetic import generate_imagefolder

ROOT = Path(__file__).resolve().parents[1]
TINY_IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200"

_spec = importlib.util.spec_from_file_location("train_cls", ROOT / "tools" / "train_cls.py")
train_cls = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cls)

# 32 images (8 per class) at 32x32, batch 16: 2 iterations per epoch, one eval at the end. Batches of
# 8 make BN at res5 (1x1 there) so noisy that the loss curve spikes; lr 0.01 keeps it smooth.
SMALL = ["data.image_size=32", "data.num_workers=0", "data.train_limit=32", "data.val_limit=8", "train.batch_size=16",
         "train.lr=0.01", "train.warmup_iters=0", "train.log_every=1", "eval.batch_size=8", "eval.every=0"]
ITERS_PER_EPOCH = 2
OVERFIT_EPOCHS = 12


def _history(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "history.jsonl").read_text().splitlines()]



@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_imagefolder(tmp_path_factory.mktemp("data") / "shapes")  # the tool's synthetic defaults


@pytest.fixture(scope="module")
def overfit_run(shapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    """ResNet-18 trained for 24 iterations on 32 generated images: output dir, metrics, the arguments."""
    output_dir = tmp_path_factory.mktemp("overfit")
    argv = ["data.synthetic.enabled=true", f"data.root={shapes_root}", f"output_dir={output_dir}", *SMALL]
    metrics = train_cls.main([*argv, f"train.epochs={OVERFIT_EPOCHS}"])
    return output_dir, metrics, argv


def test_training_lowers_loss_and_writes_outputs(overfit_run: tuple[Path, dict, list[str]]) -> None:
    output_dir, metrics, _ = overfit_run
    train = [r for r in _history(output_dir) if "train/loss" in r]
    assert [r["iteration"] for r in train] == list(range(1, ITERS_PER_EPOCH * OVERFIT_EPOCHS + 1))
    first, last = (sum(r["train/loss"] for r in part) / 4 for part in (train[:4], train[-4:]))
    assert last < 0.5 * first, f"loss did not go down: {first:.3f} -> {last:.3f}"
    written = json.loads((output_dir / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    assert set(written) == {"top1", "top5", "error", "train_top1"}
    assert 0 <= written["top1"] <= written["top5"] == 100.0  # 4 classes: top-5 always hits
    val = [r for r in _history(output_dir) if "val/error" in r]
    assert val[-1]["iteration"] == ITERS_PER_EPOCH * OVERFIT_EPOCHS
    assert val[-1]["val/error"] == pytest.approx(100 - metrics["top1"])
    for name in ("backbone.pth", "curves.png", "config.yaml", "last.pth"):
        assert (output_dir / name).is_file(), name


@pytest.mark.skipif(not TINY_IMAGENET.is_dir(), reason=f"Tiny-ImageNet not found at {TINY_IMAGENET}")
def test_tiny_imagenet_subset(tmp_path: Path) -> None:
    metrics = train_cls.main([
        "data.format=tiny-imagenet", f"data.root={TINY_IMAGENET}", "data.synthetic.enabled=false", f"output_dir={tmp_path}",
        *SMALL, "data.train_limit=64", "data.val_limit=32", "train.batch_size=32", "train.epochs=1",
        "model.input_adapter=upsample",
    ])
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert json.loads((tmp_path / "metrics.json").read_text())["top1"] == metrics["top1"]
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["model"]["backbone.fc.weight"].shape[0] == 200 and state["iteration"] == 2


def test_exported_backbone_loads_with_the_trained_features(overfit_run: tuple[Path, dict, list[str]]) -> None:
    output_dir, _, _ = overfit_run
    path = output_dir / "backbone.pth"
    report = load_backbone_weights(build_backbone("resnet18", out_features=["res4"]), path)
    assert report.missing == [] and report.unexpected == []  # the fc is left out, everything else matches
    exported = build_backbone("resnet18", weights=path, out_features=["res4"]).eval()

    cfg = OmegaConf.load(output_dir / "config.yaml")
    classifier = build_classifier(cfg.model, num_classes=4)
    classifier.load_state_dict(torch.load(output_dir / "last.pth", weights_only=True)["model"])
    trained = classifier.backbone.eval()
    trained.set_out_features(["res4"])
    assert exported.preprocessing == trained.preprocessing
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(images)["res4"], trained(images)["res4"], rtol=0, atol=0)


def test_resume_continues_from_the_saved_iteration(overfit_run: tuple[Path, dict, list[str]], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    output_dir, _, argv = overfit_run
    resumed = tmp_path / "resumed"
    shutil.copytree(output_dir, resumed)
    train_cls.main(["--resume", *argv, f"output_dir={resumed}", f"train.epochs={OVERFIT_EPOCHS + 1}"])
    done = f"at iteration {ITERS_PER_EPOCH * OVERFIT_EPOCHS} ({OVERFIT_EPOCHS} epochs and 0 batches done)"
    assert done in capsys.readouterr().out
    iterations = [r["iteration"] for r in _history(resumed) if "train/loss" in r]
    assert iterations == list(range(1, ITERS_PER_EPOCH * (OVERFIT_EPOCHS + 1) + 1))  # nothing repeated, nothing skipped
    state = torch.load(resumed / "last.pth", weights_only=True)
    assert (state["epoch"], state["iteration"]) == (OVERFIT_EPOCHS + 1, ITERS_PER_EPOCH * (OVERFIT_EPOCHS + 1))


def test_build_classifier_rejects_what_it_cannot_train() -> None:
    model_cfg = OmegaConf.load(ROOT / "configs" / "cls" / "default.yaml").model
    with pytest.raises(ValueError, match="timm backbones"):
        build_classifier({**model_cfg, "backbone": {**model_cfg.backbone, "name": "timm:resnet18"}}, 10)
    with pytest.raises(ValueError, match="input_adapter"):
        build_classifier({**model_cfg, "input_adapter": "cifar"}, 10)
    upsampled = build_classifier({**model_cfg, "input_adapter": "upsample"}, 10)
    assert upsampled(torch.rand(2, 3, 16, 16)).shape == (2, 10) and upsampled.upsample == 2
