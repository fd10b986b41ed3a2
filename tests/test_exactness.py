"""Exact runs for the three training tools: the same seed gives bit-identical weights and history whatever
data.num_workers is, and `kill -9` at a random moment followed by `--resume` ends exactly where the
uninterrupted run ends (every tensor `torch.equal`, history.jsonl line for line)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import train_cls  # noqa: E402
import train_det  # noqa: E402
import train_seg  # noqa: E402

CHECKPOINT_EVERY = 3
COMMON = ["data.synthetic.enabled=true", "train.log_every=1", f"train.checkpoint_every={CHECKPOINT_EVERY}",
          "eval.every=1"]
TOOLS = {
    "det": (train_det, ["data.synthetic.num_train=16", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
                        "data.min_size=[64]", "data.max_size=64", "model.anchor_sizes=[8,16,32,64,128]",
                        "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=50",
                        "model.roi.batch_size_per_image=32", "train.batch_size=4", "train.iters=10",
                        "train.warmup_iters=2"]),
    "seg": (train_seg, ["data.synthetic.num_train=12", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
                        "data.crop_size=48", "train.batch_size=4", "train.iters=8", "train.warmup_iters=2"]),
    "cls": (train_cls, ["data.synthetic.train_per_class=6", "data.synthetic.val_per_class=2",
                        "data.synthetic.image_size=32", "data.image_size=32", "train.batch_size=8", "train.iters=8",
                        "train.warmup_iters=2"]),
}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pth", map_location="cpu", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    unequal = [key for key in wa if not torch.equal(wa[key], wb[key])]
    assert not unequal, f"{len(unequal)} of {len(wa)} tensors differ, e.g. {unequal[:3]}"
    assert (a / "history.jsonl").read_text() == (b / "history.jsonl").read_text()



@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def argv(tool: str, data_root: Path, out: Path, *extra: str) -> list[str]:
    return [*COMMON, *TOOLS[tool][1], f"data.root={data_root / tool}", f"output_dir={out}", *extra]


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_same_seed_same_run_for_any_worker_count(tool, data_root, tmp_path):
    module = TOOLS[tool][0]
    module.main(argv(tool, data_root, tmp_path / "w0", "data.num_workers=0"))
    module.main(argv(tool, data_root, tmp_path / "w2", "data.num_workers=2"))
    assert_same_run(tmp_path / "w0", tmp_path / "w2")
    module.main(argv(tool, data_root, tmp_path / "seed1", "data.num_workers=0", "train.seed=1"))
    assert not torch.equal(*(next(iter(weights(tmp_path / r).values())) for r in ("w0", "seed1")))


def losses_logged(run: Path) -> int:
    history = run / "history.jsonl"
    return sum('"train/loss"' in line for line in history.read_text().splitlines()) if history.is_file() else 0


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_kill_9_then_resume_equals_the_uninterrupted_run(tool, data_root, tmp_path):
    module = TOOLS[tool][0]
    full, cut = tmp_path / "full", tmp_path / "cut"
    module.main(argv(tool, data_root, full, "data.num_workers=0"))
    total = losses_logged(full)

    # a different moment on every run of the suite, after the first checkpoint (a run killed before any
    # checkpoint has nothing to resume: `--resume` says so, and the run starts again)
    kill_after = random.Random(os.getpid()).randint(CHECKPOINT_EVERY + 1, total - 2)
    script = ROOT / "tools" / f"train_{tool}.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(script), *argv(tool, data_root, cut, "data.num_workers=2")],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while losses_logged(cut) < kill_after and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the run and its DataLoader workers
    process.wait()
    assert losses_logged(cut) < total, "the run finished before it was killed"

    module.main(argv(tool, data_root, cut, "data.num_workers=0", "--resume"))
    assert not list(cut.glob(".last.pth.*.tmp"))
    assert_same_run(full, cut)
