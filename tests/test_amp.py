"""Every `train.amp` mode a config accepts on the CPU (false, bf16) trains a real step in each of the three tools;
the CUDA-only modes (true = fp16, fp16) are refused on the CPU before any data is read."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import train_cls  # noqa: E402
import train_det  # noqa: E402
import train_seg  # noqa: E402

# Two iterations on a few generated images, no evaluation until the end (on 2 images).
TINY = {
    "det": (train_det, ["data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
                        "data.min_size=[64]", "data.max_size=64", "model.rpn.pre_nms_top_n_test=100",
                        "model.rpn.post_nms_top_n_test=50", "model.roi.batch_size_per_image=16"]),
    "seg": (train_seg, ["data.crop_size=48", "data.val_limit=2"]),
    "cls": (train_cls, ["data.image_size=32", "data.train_limit=8", "data.val_limit=4"]),
}
COMMON = ["data.synthetic.enabled=true", "data.num_workers=0", "train.batch_size=2", "train.iters=2",
          "train.warmup_iters=0", "train.log_every=1", "eval.every=0"]


@pytest.mark.parametrize("amp", ["false", "bf16"])
@pytest.mark.parametrize("task", ["det", "seg", "cls"])
def test_each_cpu_amp_mode_trains(task: str, amp: str, tmp_path: Path) -> None:
    tool, tiny = TINY[task]
    out = tmp_path / "run"
    tool.main([*COMMON, *tiny, f"data.root={tmp_path / 'data'}", f"output_dir={out}", f"train.amp={amp}"])
    losses = [r["train/loss"] for r in map(json.loads, (out / "history.jsonl").read_text().splitlines())
              if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("amp", ["true", "fp16"])
@pytest.mark.parametrize("task", ["det", "seg", "cls"])
def test_cuda_only_amp_modes_are_refused_on_the_cpu(task: str, amp: str, tmp_path: Path) -> None:
    tool, tiny = TINY[task]
    with pytest.raises(ValueError, match=r"needs device=cuda"):
        tool.main([*COMMON, *tiny, f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}",
                   f"train.amp={amp}"])
    assert not (tmp_path / "data").exists()  # refused before any data was written
