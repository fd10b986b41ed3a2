"""tools/train_det.py end to end: default config, real COCO / VOC data, overfitting, resume, DDP, tools."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
sys.path.insert(0, str(ROOT / "tools"))

import test_det  # noqa: E402
import train_det  # noqa: E402
import visualize_det  # noqa: E402

SHAPES = "data.synthetic.enabled=true"  # the generated demo set, written into data.root
TINY = ["data.num_workers=0", "model.rpn.pre_nms_top_n_test=200", "model.rpn.post_nms_top_n_test=100",
        "model.roi.batch_size_per_image=32", "train.log_every=1"]


def history(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "history.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> list[float]:
    return [record["train/loss"] for record in history(output_dir) if "train/loss" in record]


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """Overfit 4 generated images and evaluate on the same 4: the detector must really learn."""
    tmp = tmp_path_factory.mktemp("shapes")
    root, out = tmp / "shapes", tmp / "run"
    val = [f"data.val.images={root}/train", f"data.val.annotations={root}/annotations/instances_train.json"]
    metrics = train_det.main([*TINY, SHAPES, f"data.root={root}", *val, f"output_dir={out}", "data.synthetic.image_size=64",
                              "data.min_size=[64]", "data.max_size=64", "model.anchor_sizes=[8,16,32,64,128]",
                              "data.train_limit=4", "data.val_limit=4", "data.flip_prob=0", "train.batch_size=4",
                              "train.iters=50", "train.lr=0.01", "train.warmup_iters=10", "eval.every=0",
                              "train.lr_steps=[0.8]"])
    return out, metrics


def test_default_config_run_writes_its_outputs_and_learns(shapes_run):
    out, metrics = shapes_run
    for name in ("config.yaml", "last.pth", "metrics.json", "history.jsonl"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    written = json.loads((out / "metrics.json").read_text())
    assert set(written) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert written["AP50"] == pytest.approx(metrics["AP50"])
    assert metrics["AP50"] > 0.5, metrics  # overfitting 4 images of 3 clear shapes


def test_test_det_and_visualize_det_use_the_checkpoint(shapes_run, tmp_path):
    out, metrics = shapes_run
    tested = test_det.main(["--config", str(out / "config.yaml"), "--checkpoint", str(out / "last.pth")])
    assert tested["AP50"] == pytest.approx(metrics["AP50"], abs=1e-6)
    assert json.loads((out / "test_metrics.json").read_text())["AP"] == pytest.approx(metrics["AP"])
    pngs = visualize_det.main(["--config", str(out / "config.yaml"), "--checkpoint", str(out / "last.pth"),
                               "--out", str(tmp_path / "vis"), "--num", "2", "--score-thresh", "0.3"])
    gt = visualize_det.main(["--config", str(out / "config.yaml"), "--gt", "--out", str(tmp_path / "gt"), "--num", "2"])
    assert len(pngs) == 2 and len(gt) == 2 and all(p.stat().st_size > 0 for p in pngs + gt)


def test_resume_continues_from_the_saved_iteration(shapes_run, tmp_path):
    source, _ = shapes_run
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "last.pth").write_bytes((source / "last.pth").read_bytes())
    config = source / "config.yaml"
    train_det.main(["--config", str(config), "--resume", f"output_dir={out}", "train.iters=52", "data.val_limit=2"])
    iterations = [record["iteration"] for record in history(out) if "train/loss" in record]
    assert iterations == [51, 52]


def test_mistyped_key_suggests_the_nearest(capsys):
    with pytest.raises(SystemExit):
        train_det.main(["train.learning_rate=0.1"])
    assert "train.lr" in capsys.readouterr().err


needs_shared = pytest.mark.skipif(not (SHARED / "coco128").is_dir(), reason="../shared/data/coco128 not present")


def overfit_loss_drops(config: str, out: Path, extra: list[str]) -> dict:
    metrics = train_det.main(["--config", str(ROOT / "configs" / "det" / config), *TINY, f"output_dir={out}",
                              f"data.root={SHARED / ('coco128' if config == 'coco128.yaml' else 'coco128-voc/VOCdevkit/VOC2012')}",
                              "data.train_limit=2", "data.val_limit=2", "data.min_size=[160]", "data.max_size=160",
                              "data.flip_prob=0", "train.batch_size=2", "train.iters=8", "train.lr=0.01",
                              "train.warmup_iters=2", *extra])
    losses = train_losses(out)
    assert len(losses) == 8
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    return metrics


@needs_shared
def test_coco128_iterations_reduce_loss_and_write_metrics(tmp_path):
    metrics = overfit_loss_drops("coco128.yaml", tmp_path, [])
    assert set(json.loads((tmp_path / "metrics.json").read_text())) >= {"AP", "AP50", "APl"}
    assert 0.0 <= metrics["AP"] <= 1.0


@needs_shared
def test_coco128_voc_iterations_reduce_loss_and_write_voc_metrics(tmp_path):
    metrics = overfit_loss_drops("coco128_voc.yaml", tmp_path, ["eval.metric=voc07"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert "mAP" in written and len(written["AP_per_class"]) == 20
    assert metrics["mAP"] == pytest.approx(written["mAP"], nan_ok=True)


# Records every file each rank opens for writing, through Python's audit hook (sitecustomize runs at start-up).
WRITES_HOOK = """
import os, sys
def _hook(event, args):
    if event == "open" and isinstance(args[0], str) and args[0].startswith(os.environ["WATCH_DIR"]) \\
            and any(flag in str(args[1]) for flag in "wax+"):
        with open(os.environ["WRITES_LOG"] + os.environ.get("RANK", "x"), "a") as f:
            f.write(args[0] + "\\n")
if "WATCH_DIR" in os.environ:
    sys.addaudithook(_hook)
"""


def test_two_process_ddp_on_cpu_only_rank0_writes_and_it_resumes(tmp_path):
    out = tmp_path / "ddp"
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(WRITES_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WATCH_DIR": str(out), "WRITES_LOG": str(tmp_path / "writes-rank"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
               str(ROOT / "tools" / "train_det.py"), *TINY, SHAPES, f"data.root={tmp_path / 'shapes'}", f"output_dir={out}",
               "data.train_limit=8", "data.val_limit=6", "train.batch_size=2", "eval.batch_size=2"]
    result = subprocess.run([*command, "train.iters=2"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "metrics.json").is_file() and (out / "last.pth").is_file()
    assert [r["iteration"] for r in history(out) if "train/loss" in r] == [1, 2]  # 8 images / (2 ranks x 2) per epoch
    assert (tmp_path / "writes-rank0").read_text() and not (tmp_path / "writes-rank1").exists()
    assert len(torch.load(out / "last.pth", weights_only=True)["rng"]) == 2  # both ranks' random states

    result = subprocess.run([*command, "train.iters=4", "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["iteration"] for r in history(out) if "train/loss" in r] == [1, 2, 3, 4]
    assert not (tmp_path / "writes-rank1").exists()
