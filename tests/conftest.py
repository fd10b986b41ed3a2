"""Shared by the test modules: one torch thread, and a tiny trained detection run (trained once, used by
tests/test_predict.py and tests/test_export.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in every test module: on 2 shared cores OpenMP threads waiting on each other made steps
    ~10x slower, and in-process runs compared bit for bit with subprocesses (OMP_NUM_THREADS=1) need the same
    thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_det_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Faster R-CNN R18-FPN overfitted on 4 generated 64 px images for 40 iterations (~30 s on one CPU thread),
    evaluated on the same 4: detections good enough (AP50 > 0.3) that agreement tests mean something."""
    sys.path.insert(0, str(ROOT / "tools"))
    import train_det

    tmp = tmp_path_factory.mktemp("tiny_det")
    root, out = tmp / "shapes", tmp / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_det.main([
            "data.synthetic.enabled=true", f"data.root={root}", f"output_dir={out}", "data.num_workers=0",
            "data.synthetic.image_size=64",
            "data.synthetic.num_train=4", "data.synthetic.num_val=4",
            f"data.val.images={root}/train", f"data.val.annotations={root}/annotations/instances_train.json",
            "data.min_size=[64]", "data.max_size=64", "model.anchor_sizes=[8,16,32,64,128]", "data.flip_prob=0",
            "model.rpn.pre_nms_top_n_test=200", "model.rpn.post_nms_top_n_test=100", "model.roi.batch_size_per_image=32",
            "train.batch_size=4", "train.iters=40", "train.lr=0.01", "train.warmup_iters=10", "train.lr_steps=[0.8]",
            "eval.every=0", "train.log_every=10"])
    finally:
        torch.set_num_threads(threads)
    return out
