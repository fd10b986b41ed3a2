"""The paper's Figure 6 at small scale: training and test error of plain vs residual CIFAR nets, over seeds.

    python tools/cifar_degradation.py --class-subset 20                 # plain20/56, resnet20/56 x seeds 0 1 2
    python tools/cifar_degradation.py --nets plain20 plain32 plain44 plain56 resnet20 resnet32 resnet44 resnet56
    python tools/cifar_degradation.py --config configs/cls/cifar10_resnet_paper.yaml \
        --output-dir outputs/cifar10_degradation data.root=/data/cifar-10-batches-py device=cuda   # the real thing

For every seed x net, tools/train_cls.py runs as a child process (experiments.stages.run_tool) with the given
config and overrides plus model.backbone.name, train.seed and output_dir=<output-dir>/<net>/seed<k>. A run whose
metrics.json exists is not redone (one with only last.pth is resumed), so rerunning the command continues an
interrupted experiment.
`--class-subset N` trains on the first N (sorted) classes of a tiny-imagenet format data.root (symlinks in
<output-dir>/data/). Writes to <output-dir>: results.json (final errors per run, statistics, comparisons),
results.md, reproduction.json (experiments cifar_degradation_train_error and cifar_test_error, in percent: the
final training error is 100 - the last epoch's training top-1, on augmented crops in train mode; the test error
is 100 - the final val top-1), degradation.png (per net, mean over seeds: training error dashed, test error bold)
and runs.log.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from classification.build import DEFAULT_CONFIG as CLS_DEFAULT_CONFIG  # noqa: E402
from engine.config import CONFIGS_DIR, load_config  # noqa: E402
from engine.output import HISTORY  # noqa: E402
from experiments.figures import plot_degradation  # noqa: E402
from experiments.stages import format_duration, run_stage, tiny_imagenet_subset  # noqa: E402
from experiments.statistics import (compare_pairs, condition_statistics, experiment_record,  # noqa: E402
                                    statistics_markdown)

DEFAULT_CONFIG = CONFIGS_DIR / "cls" / "tiny32_cifar_style.yaml"
DEFAULT_NETS = ("plain20", "plain56", "resnet20", "resnet56")
RUN_LOG = "runs.log"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="train_cls.py config")
    parser.add_argument("--nets", nargs="+", default=list(DEFAULT_NETS), help="CIFAR net names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--class-subset", type=int, help="first N classes of a tiny-imagenet data.root")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/cifar_degradation"))
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="train_cls.py config overrides")
    args = parser.parse_args(argv)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    if args.class_subset:
        data = load_config(CLS_DEFAULT_CONFIG, args.config, overrides).data
        subset = tiny_imagenet_subset(Path(data.root), args.class_subset, out / "data", data.format)
        overrides.append(f"data.root={subset}")

    start, ran, runs = time.time(), [], []
    for seed in args.seeds:  # seed-major: a run stopped early has every net for the first seeds
        for net in args.nets:
            run_dir = out / net / f"seed{seed}"
            argv_run = [f"--config={args.config}", *overrides, f"model.backbone.name={net}", f"train.seed={seed}"]
            metrics, wall = run_stage("train_cls", argv_run, run_dir, out, start, ran,
                                      tag="cifar_degradation", log_name=RUN_LOG)
            train_top1 = metrics.get("train_top1")
            runs.append({"net": net, "seed": seed, "test_error": 100 - metrics["top1"],
                         "train_error": None if train_top1 is None else 100 - train_top1, "wall_s": wall,
                         "history": str(run_dir / HISTORY)})

    experiments = {
        "cifar_degradation_train_error": experiment_record(
            "final training error (%, last epoch, augmented crops)", False,
            [(r["net"], r["seed"], r["train_error"]) for r in runs]),
        "cifar_test_error": experiment_record("final test error (%)", False,
                                              [(r["net"], r["seed"], r["test_error"]) for r in runs]),
    }
    summary_rows = condition_statistics(experiments)
    comparison_rows = compare_pairs(experiments, [(name, a, b) for name in experiments
                                                  for a, b in orderings(args.nets)])
    results = {"nets": args.nets, "seeds": args.seeds, "config": str(args.config), "overrides": overrides,
               "runs": runs, "summaries": summary_rows, "comparisons": comparison_rows, "runs_done": ran,
               "wall_s": time.time() - start}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "reproduction.json").write_text(json.dumps({"experiments": experiments}, indent=2) + "\n")
    walls = [r["wall_s"] for r in runs if r["wall_s"]]
    markdown = [f"# Degradation (Figure 6): {' '.join(args.nets)} x seeds {args.seeds}", "",
                f"`{args.config}` {' '.join(overrides)}; errors in percent, statistics over seeds.", "",
                *statistics_markdown(summary_rows, comparison_rows), "",
                f"{len(runs)} runs, {format_duration(sum(walls))} of training in all."]
    (out / "results.md").write_text("\n".join(markdown) + "\n")
    plot_degradation(runs, out / "degradation.png")
    print((out / "results.md").read_text())
    print(f"[cifar_degradation] done: {len(ran)} run(s) trained; results in {out}")
    return results


def orderings(nets: list[str]) -> list[tuple[str, str]]:
    """(A, B) pairs where the paper expects A to have the lower error: a shallower plain net beats a deeper one
    (the degradation problem), a deeper ResNet beats a shallower one, and a ResNet beats its plain twin."""
    depth = {net: int(re.sub(r"\D", "", net)) for net in nets}
    plain = sorted((n for n in nets if n.startswith("plain")), key=depth.get)
    resnet = sorted((n for n in nets if n.startswith("resnet")), key=depth.get)
    pairs = [(a, b) for a, b in zip(plain, plain[1:])]
    pairs += [(b, a) for a, b in zip(resnet, resnet[1:])]
    pairs += [(r, f"plain{depth[r]}") for r in resnet if f"plain{depth[r]}" in nets]
    return pairs


if __name__ == "__main__":
    main()
