"""Start-up, memory and evaluation of train_det at COCO 2017's size, beside the json loading of its peers.

    python tools/benchmark_scale.py                                   # data in ~/scale_coco, JSON on stdout
    python tools/benchmark_scale.py --root /data/scale --out docs/benchmark_scale.json --markdown

Builds (once; reused when its marker file matches) a simulated COCO 2017 in `--root`: 118,287 train images as
real 640x480 JPEG files (hard links to 2,000 generated images, so it costs ~180 MB of disk), 860,001 boxes with
COCO-like polygons (the json is ~430 MB, COCO's is 448 MB), 80 category ids with COCO's gaps, 5,000 val images with
36,781 boxes. Then measures, each in a fresh process, on `configs/det/r50_fpn_coco.yaml` (device=cpu, 2 loader
workers):

- time to iteration 1 of `tools/train_det.py`, cold (empty validation cache) and warm (the cache of the cold
  run), split by stage: start-up (imports, config), json read, records, validation, model build, first step
  (loop set-up, worker start, first batch, forward + backward);
- peak RSS of that process (VmHWM), and over >= 3,000 iterations of the training loop's own DataLoader the
  RSS / PSS (/proc/<pid>/smaps_rollup) of the main process and of each worker; worker growth = the rise of a
  worker's PSS per 1,000 loader iterations after the first 200 (least-squares slope);
- evaluation (`CocoEvaluator`, the default backend) of 5,000 images x 100 detections;
- the size and save time of a checkpoint of that model with its optimizer state;
- peers, same json, same run: pycocotools' `COCO(json)` alone; torchvision's detection reference
  (references/detection/coco_utils.py: `torchvision.datasets.CocoDetection`, i.e. pycocotools, plus its
  `_coco_remove_images_without_annotations`); Detectron2's `load_coco_json` + `NumpySerializedList`,
  re-implemented minimally here (Detectron2 is not on PyPI): time and peak RSS of each.

Every figure carries the load average at the time it was taken. `--checkout DIR` measures another ResDet
checkout's code with the same harness (the "before" figures). Nothing is written into the data folder after it
was built: caches and run folders go to `--root`/work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's harness; the measured checkout goes first inside each process

from experiments.scale_benchmark import (CONFIG, COCO_SIZES, GROWTH_FROM, LOADER_ITERS,  # noqa: E402
                                         build_simulated_coco, load_average, run_child, train_det_command,
                                         worker_growth)


def measure(mode: str, env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """One measurement in a fresh process (this file with --child), with the load average before it."""
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {"mode": mode, "out": str(out), "launched": time.time(), **kwargs}
        subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                       env={**os.environ, **(env or {})})
        result = json.loads(out.read_text())
    return {**result, "load_average": {"before": load, "after": load_average()}}


def git_commit(checkout: Path) -> str:
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return found.stdout.strip() + ("+changes" if dirty else "")


def measure_scale(args: argparse.Namespace) -> dict[str, Any]:
    # imported here, not above: it imports torch, which the measuring processes (this file too) must not load early
    from experiments.benchmarking import cpu_model  # noqa: PLC0415
    root, checkout = Path(args.root).expanduser().absolute(), Path(args.checkout).absolute()
    started = time.perf_counter()
    sizes = {key: max(1, round(value * args.scale)) if key.endswith(("images", "boxes")) else value
             for key, value in COCO_SIZES.items()}
    data = build_simulated_coco(root, sizes)
    (root / "work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root / "work"))
    cache = {"RESDET_CACHE": str(work / "cache")}  # empty: the cold run; the warm run finds what it wrote
    common = {"checkout": str(checkout), "data": str(data)}
    cold = measure("first_iteration", cache, output_dir=str(work / "cold"), **common)
    warm = measure("first_iteration", cache, output_dir=str(work / "warm"), **common)
    loader = measure("loader_memory", cache, output_dir=str(work / "loader"), iterations=args.loader_iters, **common)
    evaluation = measure("evaluation", detections=100, **common)
    checkpoint = measure("checkpoint", work=str(work), **common)
    peers = {peer: measure(peer, data=str(data)) for peer in ("pycocotools", "torchvision_reference", "detectron2")}
    shutil.rmtree(work)
    growth = worker_growth(loader["samples"])
    last = loader["samples"][-1]
    return {
        "first_iteration_s": {"cold": cold["seconds"], "warm": warm["seconds"]},
        "worker_growth_mib_per_1k_iters": max(growth),
        "peak_rss_mib": max(cold["peak_rss_data_mib"], warm["peak_rss_data_mib"]),
        "peak_rss_with_first_step_mib": max(cold["peak_rss_mib"], warm["peak_rss_mib"]),
        "eval_s": evaluation["seconds"],
        "stages_s": {"cold": cold["stages_s"], "warm": warm["stages_s"]},
        "first_iteration": {"cold": cold, "warm": warm},
        "memory": {"worker_growth_mib_per_1k_iters_each": growth, "loader_iterations": args.loader_iters,
                   "steady_main": last["main"], "steady_workers": last["workers"], "samples": loader["samples"],
                   "load_average": loader["load_average"]},
        "evaluation": evaluation,
        "checkpoint": checkpoint,
        "peers": peers,
        "setup": {"checkout": str(checkout), "commit": git_commit(checkout), "config": str(CONFIG),
                  "overrides": train_det_command(ROOT, Path("<data>"), Path("<out>"))[2:-1], "data": str(data),
                  "sizes": sizes, "cpu": cpu_model() or platform.processor(), "cpus": os.cpu_count(),
                  "python": platform.python_version(), "total_s": round(time.perf_counter() - started, 1)},
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md's scale section."""
    stages = list(result["stages_s"]["cold"])
    rows = ["| | cold cache | warm cache |", "|---|---:|---:|",
            f"| **time to iteration 1 (s)** | **{result['first_iteration_s']['cold']}** | "
            f"**{result['first_iteration_s']['warm']}** |"]
    rows += [f"| {stage.replace('_', ' ')} | {result['stages_s']['cold'][stage]} | {result['stages_s']['warm'][stage]} |"
             for stage in stages]
    first = result["first_iteration"]
    rows += [f"| peak RSS up to the model build: start-up (MiB) | {first['cold']['peak_rss_data_mib']} | "
             f"{first['warm']['peak_rss_data_mib']} |",
             f"| RSS after the data stages (MiB) | {first['cold']['rss_after_data_mib']} | "
             f"{first['warm']['rss_after_data_mib']} |",
             f"| peak RSS with the first step (MiB) | {first['cold']['peak_rss_mib']} | {first['warm']['peak_rss_mib']} |",
             f"| load average before / after | {first['cold']['load_average']['before']} / "
             f"{first['cold']['load_average']['after']} | {first['warm']['load_average']['before']} / "
             f"{first['warm']['load_average']['after']} |"]
    memory = result["memory"]
    rows += ["", f"| over {memory['loader_iterations']:,} loader iterations | RSS (MiB) | PSS (MiB) | PSS growth after "
             f"{GROWTH_FROM} its (MiB / 1,000 its) |", "|---|---:|---:|---:|",
             f"| main process (end) | {memory['steady_main']['rss']:.0f} | {memory['steady_main']['pss']:.0f} | |"]
    rows += [f"| worker {w} (end) | {m['rss']:.0f} | {m['pss']:.0f} | {g} |"
             for w, (m, g) in enumerate(zip(memory["steady_workers"], memory["worker_growth_mib_per_1k_iters_each"]))]
    rows += ["", "| other figures | value | load average |", "|---|---:|---:|",
             f"| evaluation, 5,000 images x 100 detections (s) | {result['eval_s']} | "
             f"{result['evaluation']['load_average']['before']} |",
             f"| checkpoint size (MiB) / save (s) | {result['checkpoint']['size_mib']} / "
             f"{result['checkpoint']['save_s']} | {result['checkpoint']['load_average']['before']} |"]
    rows += ["", "| json loading of the train split | seconds | peak RSS (MiB) | load average |", "|---|---:|---:|---:|"]
    rows += [f"| {name} | {peer['seconds']} | {peer['peak_rss_mib']:.0f} | {peer['load_average']['before']} |"
             for name, peer in result["peers"].items()]
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="~/scale_coco", help="folder for the simulated COCO and the runs' work files "
                   "(built on the first run; ~600 MB of disk; default ~/scale_coco)")
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    p.add_argument("--markdown", action="store_true", help="print the results as Markdown tables")
    p.add_argument("--checkout", default=str(ROOT), help="the ResDet checkout whose code is measured (default: "
                   "this one; another gives the 'before' figures with the same harness)")
    p.add_argument("--scale", type=float, default=1.0, help="image and box counts x this (1: COCO 2017's; a "
                   "small value checks the tool quickly)")
    p.add_argument("--loader-iters", type=int, default=LOADER_ITERS, help="loader iterations of the memory run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out and not Path(args.out).absolute().parent.is_dir():
        p.error(f"--out {args.out}: folder {Path(args.out).absolute().parent} does not exist")
    if args.loader_iters <= GROWTH_FROM + 1000:
        p.error(f"--loader-iters must be > {GROWTH_FROM + 1000} (growth is measured after iteration {GROWTH_FROM})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return None
    result = measure_scale(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(markdown(result) if args.markdown else text)
    return result


if __name__ == "__main__":
    main()
