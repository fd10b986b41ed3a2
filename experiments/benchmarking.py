"""What the benchmark tools measure with: wall time, peak memory, arithmetic, the machine's ceiling, the machine.

Written once so tools/benchmark_det.py, benchmark_seg.py, benchmark_data.py and benchmark_report.py time and
describe a run the same way (benchmark_scale.py measures any checkout, older ones included, so it imports
nothing of the checkout it lives in). Also the checks a speed comparison needs to be a comparison of the same
work: two detectors' outputs and two sets of losses compared within a tolerance.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------- time
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not need it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | None = None) -> tuple[T, float]:
    """`fn()`'s result and the seconds it took, the device's queued work included."""
    device = device or torch.device("cpu")
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def timed_calls(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device | None = None) -> list[float]:
    """Seconds of each of `iters` calls of `fn()`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn, device)[1] for _ in range(iters)]


# ----------------------------------------------------------------------------------------------- memory
def proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM...) in MiB, None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of what runs between start() and stop(), over the memory in use at start()."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:  # "5" resets the peak RSS (VmHWM) of this process to its current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after reset via /proc/self/clear_refs"
        except OSError:
            self.method = "ru_maxrss (monotonic: includes the setup's peak)"
        self.baseline = proc_status_mib("VmRSS") or 0.0

    def stop(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method.startswith("VmHWM"):
            peak = proc_status_mib("VmHWM") or 0.0
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return dict(method=self.method, baseline_mb=round(self.baseline, 1), peak_mb=round(peak, 1),
                    delta_mb=round(max(peak - self.baseline, 0.0), 1))


# ----------------------------------------------------------------------------------------------- arithmetic
def count_gflop(fn: Callable[[], Any]) -> float:
    """GFLOP of the convolutions and matrix products `fn()` runs (FlopCounterMode: 2 per multiply-add)."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.mm: _mm_flop}) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _mm_flop(a: torch.Tensor, b: torch.Tensor, *args, out_val=None, **kwargs) -> int:
    """FlopCounterMode's count for `a @ b`, except that a sparse `a` (our RoIAlign backward's CSR matrix)
    costs its nonzeros, not its dense shape."""
    if a.layout != torch.strided:
        return 2 * a._nnz() * b.shape[1]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


_mm_flop._get_raw = True  # FlopCounterMode passes the tensors themselves, so the layout can be seen


def measure_ceiling(device: torch.device, n: int = 2048, repeats: int = 5) -> dict:
    """The machine's dense fp32 rate at this thread count: the best of `repeats` n x n x n matrix products."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    times = timed_calls(lambda: torch.mm(a, b), 0, repeats + 1, device)  # the first one warms the kernels up
    return dict(op=f"fp32 matmul {n}x{n}x{n}", gflop_per_s=2 * n**3 / min(times[1:]) / 1e9,
                threads=torch.get_num_threads())


# ----------------------------------------------------------------------------------------------- the machine
def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo, None where it cannot be read (each report says what it falls
    back to: platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------------- same work?
def compare_ranked_detections(a: dict, b: dict, rtol: float, atol: float) -> dict:
    """Same detections ({boxes, scores, labels}) in the same order, boxes and scores within rtol/atol (of b)."""
    out = dict(num_detections=[len(a["labels"]), len(b["labels"])])
    same_labels = len(a["labels"]) == len(b["labels"]) and torch.equal(a["labels"], b["labels"])
    out["labels_equal"] = same_labels
    if same_labels and len(a["labels"]):
        out["max_abs_box_diff"] = float((a["boxes"].double() - b["boxes"].double()).abs().max())
        out["max_abs_score_diff"] = float((a["scores"].double() - b["scores"].double()).abs().max())
    out["passed"] = bool(same_labels and len(a["labels"]) > 0
                         and torch.allclose(a["boxes"].double(), b["boxes"].double(), rtol=rtol, atol=atol)
                         and torch.allclose(a["scores"].double(), b["scores"].double(), rtol=rtol, atol=atol))
    return out


def matched_fraction(a: dict, b: dict, box_tol: float = 0.5, score_tol: float = 1e-3) -> float:
    """Share of a's detections that b also has (same label, box and score close), in any order."""
    if len(a["labels"]) == 0:
        return float(len(b["labels"]) == 0)
    if len(b["labels"]) == 0:
        return 0.0
    close = ((a["boxes"][:, None].double() - b["boxes"][None].double()).abs().amax(-1) <= box_tol) \
        & ((a["scores"][:, None].double() - b["scores"][None].double()).abs() <= score_tol) \
        & (a["labels"][:, None] == b["labels"][None])
    return float(close.any(1).double().mean())


def losses_close(a: dict[str, float], b: dict[str, float], rtol: float, atol: float) -> bool:
    """The same loss terms, each within atol + rtol * |b|."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= atol + rtol * abs(b[k]) for k in b)
