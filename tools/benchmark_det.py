"""Speed and memory of our Faster R-CNN R50-FPN next to torchvision's, doing the same work.

    python tools/benchmark_det.py --markdown                              # 512 px, 2 threads, CPU
    python tools/benchmark_det.py --size 800 --batch 4 --device cuda --iters 20 --markdown
    python tools/benchmark_det.py --backbone resnet18 --size 256         # ours only, a quick look

Measured (see docs/benchmarks.md for the method and results):

- training throughput (images/s): forward + backward + SGD step on a fixed batch of random images with
  1-4 random boxes each; torchvision's `fasterrcnn_resnet50_fpn` recipe (FrozenBN, layers 2-4 trainable)
  against ours (FrozenBN, freeze_at=2);
- inference latency (ms/image, median, batch 1): torchvision; ours; ours with BN folded into the convs;
  ours folded + channels_last; that plus backbone + FPN compiled (`detection.fast.optimize_for_inference`,
  the form test_det / visualize_det / the Predictor run); on CPU also the int8 form (`detection.quantize`,
  `test_det.py --int8`; not exact, so outside the checks) and a bf16 autocast form (not exact either); with
  the time of each stage (transform, backbone + FPN, RPN, RoI heads, post-processing);
- where the time goes: the arithmetic of each (model, phase) counted on the same input
  (`torch.utils.flop_counter.FlopCounterMode`: convolutions and matrix products), the GFLOP/s achieved, and
  the ceiling measured in the same run at the same thread count (an fp32 matrix product: sgemm on CPU);
- training throughput of ours in channels_last and under bf16 autocast (`train.amp=bf16`: fast only where the
  CPU has bf16 instructions, AMX or AVX512_BF16; elsewhere it is emulated and slower) too;
- peak memory of each (model, phase): on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's
  peak RSS (VmHWM, reset through /proc/self/clear_refs after the model and inputs are set up), each
  (model, phase) in a fresh subprocess so no earlier phase's freed-but-cached memory is reused.

Both models carry the same weights (torchvision's randomly initialised state dict, loaded into ours)
and get the same already-sized images (torchvision's model is built with min_size = max_size = --size,
so its resize is the identity). The run fails unless the two give the same detections and the same
first-step training losses, and unless the folded / channels_last variants give ours' detections (in
float64, where rounding cannot reorder near-tied scores of a randomly initialised model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from experiments.detection_benchmark import DEFAULTS, STAGES, run_benchmark, run_phase  # noqa: E402

RESULT_TAG = "BENCHMARK_PHASE_RESULT "


def run_phase_isolated(spec: dict) -> dict:
    """run_phase in a fresh Python process (for an honest per-phase peak memory)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["settings"]["threads"]),
               MKL_NUM_THREADS=str(spec["settings"]["threads"]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_phase", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {spec['phase']}/{spec['model']} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith(RESULT_TAG))
    return json.loads(line[len(RESULT_TAG):])


LABELS = dict(torchvision="torchvision R50-FPN", ours="ours", ours_fold="ours + fold BN",
              ours_fold_channels_last="ours + fold BN + channels_last",
              ours_fast_compiled="ours + fold BN + channels_last + compile", ours_channels_last="ours, channels_last",
              ours_int8="ours + fold BN + channels_last + int8 (not exact)",
              ours_bf16="ours, bf16 autocast (+ fold BN + channels_last at inference; not exact)")


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def to_markdown(results: dict) -> str:
    s, env = results["settings"], results["environment"]
    device = env.get("cuda_device", env["cpu_model"]) if s["device"] == "cuda" else env["cpu_model"]
    mem = "peak CUDA alloc" if s["device"] == "cuda" else "peak RSS"
    bb = "R50" if s["backbone"] == "resnet50" else s["backbone"]
    ceiling = results["ceiling"]
    label = lambda name: f"ours {bb}-FPN" if name == "ours" else LABELS[name]  # noqa: E731
    lines = [f"{s['size']}x{s['size']} images, {s['device']} ({device}), {s['threads']} threads, "
             f"warmup {s['warmup']}, iters {s['iters']}; torch {env['torch']}, torchvision {env['torchvision']}; "
             f"load average {results['loadavg_start'][0]:.1f} -> {results['loadavg_end'][0]:.1f}; "
             f"ceiling ({ceiling['op']}, same run, same threads) {ceiling['gflop_per_s']:.1f} GFLOP/s",
             "",
             f"| Training, batch {s['batch']} | images/s | s/step (median) | speedup vs torchvision | GFLOP/step | "
             f"GFLOP/s | of ceiling | {mem} over setup (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["training"].items():
        lines.append(f"| {label(name)} | {r['images_per_s']:.3f} | {r['step_s_median']:.2f} | "
                     f"{_fmt(r['speedup_vs_torchvision'], '.2f', 'x')} | {r['gflop_per_step']:.1f} | "
                     f"{r['gflop_per_s']:.1f} | {r['ceiling_fraction']:.0%} | {r['memory']['delta_mb']:.0f} |")
    lines += ["", f"| Inference, batch 1 | ms/image (median) | speedup vs torchvision | speedup vs ours | GFLOP | "
                  f"GFLOP/s | of ceiling | first call (s) | {mem} over setup (MB) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["inference"].items():
        lines.append(f"| {label(name)} | {r['ms_per_image_median']:.1f} | {_fmt(r['speedup_vs_torchvision'], '.2f', 'x')} | "
                     f"{_fmt(r['speedup_vs_ours'], '.2f', 'x')} | {r['gflop']:.1f} | {r['gflop_per_s']:.1f} | "
                     f"{r['ceiling_fraction']:.0%} | {r['first_call_s']:.1f} | {r['memory']['delta_mb']:.0f} |")
    lines += ["", "| Inference stages, ms (median) | " + " | ".join(STAGES) + " | sum |",
              "|---|" + "---:|" * (len(STAGES) + 1)]
    for name, r in results["inference"].items():
        stages = r["stages_ms"]
        lines.append(f"| {label(name)} | " + " | ".join(f"{stages[k]:.1f}" for k in STAGES)
                     + f" | {sum(stages.values()):.1f} |")
    checks = results["checks"]
    passed = [k for k, c in checks.items() if c.get("passed") and not c.get("informational")]
    lines += ["", f"Checks passed: {', '.join(passed)}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="square image side (default 512)")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="training batch size (default 2)")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--iters", type=int, default=DEFAULTS["iters"], help="timed iterations per phase")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch.set_num_threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default=DEFAULTS["device"])
    p.add_argument("--backbone", default=DEFAULTS["backbone"],
                   help="our backbone (torchvision comparison only for resnet50; e.g. resnet18 for a quick look)")
    p.add_argument("--score-thresh", type=float, default=DEFAULTS["score_thresh"],
                   help="box score threshold for both models (default 0.05, torchvision's)")
    p.add_argument("--out", default="docs/benchmarks.json", help="machine-readable results ('' to skip)")
    p.add_argument("--markdown", action="store_true", help="print the results as Markdown tables")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every phase in this process (faster; peak memory then approximate)")
    p.add_argument("--_phase", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args._phase:  # child process of run_phase_isolated
        print(RESULT_TAG + json.dumps(run_phase(json.loads(args._phase))), flush=True)
        return None
    settings = dict(size=args.size, batch=args.batch, warmup=args.warmup, iters=args.iters, threads=args.threads,
                    device=args.device, backbone=args.backbone, score_thresh=args.score_thresh)
    settings = {**DEFAULTS, **settings}
    results = run_benchmark(settings, run=run_phase if args.no_isolate else run_phase_isolated)
    results["command"] = "python tools/benchmark_det.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
    if args.markdown:
        print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
