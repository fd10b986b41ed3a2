"""tools/benchmark_seg.py compares the same work: equal logits, positive latencies, JSON written."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import benchmark_seg  # noqa: E402


def test_benchmark_seg_runs_and_checks_equivalence(tmp_path):
    out = tmp_path / "seg.json"
    results = benchmark_seg.main(["--size", "64", "--warmup", "0", "--iters", "1", "--threads", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["max_logit_difference"] <= 1e-4
    assert written["ours_ms"] > 0 and written["torchvision_ms"] > 0
    assert results["speedup"] == written["speedup"]
