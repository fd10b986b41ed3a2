"""The figures of an experiment over seeds: classification error curves (the paper's Figures 4 / 6), detection AP
with and without pretraining, and one panel per ordering of a metric."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from .statistics import condition_values, format_interval, summarize


def plot_orderings(results: dict, experiment: str, path: Path) -> None:
    """One panel per ordering of `experiment` (a detection metric): each seed's value of A and B (dots), their
    means with 95 % CIs, and A - B's Welch interval with the verdict in the title."""
    metric = results["experiments"][experiment]["metric"]
    rows = [r for r in results["comparisons"] if r["experiment"] == experiment]
    if not rows:
        return
    experiments = results["experiments"]
    columns = min(3, len(rows))
    fig = Figure(figsize=(4.2 * columns, 3.6 * ((len(rows) + columns - 1) // columns)), layout="constrained")
    axes = fig.subplots((len(rows) + columns - 1) // columns, columns, squeeze=False).flat
    for ax in axes[len(rows):]:  # the last row's empty places
        ax.set_visible(False)
    for ax, row in zip(axes, rows):
        for x, condition in enumerate((row["a"], row["b"])):
            values = condition_values(experiments[row["experiment"]], condition)
            s = summarize(values)
            ax.plot([x] * len(values), values, "o", color=f"C{x}", alpha=0.6)
            ax.errorbar([x + 0.15], [s.mean], yerr=[[s.mean - (s.ci_low if s.ci_low is not None else s.mean)],
                                                    [(s.ci_high if s.ci_high is not None else s.mean) - s.mean]],
                        fmt="s", color=f"C{x}", capsize=4)
        ax.set_xticks([0, 1], [row["a"], row["b"]], fontsize=8)
        ax.set_xlim(-0.5, 1.6)
        ax.set_ylabel(metric)
        ax.set_title(f"A − B = {row['diff']:+.1f} {format_interval(row['ci_low'], row['ci_high'])}\n"
                     f"paper {row['paper'].replace('<=', '≤')}: {'agrees' if row['agrees'] else 'does not agree'}",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{metric}: dots = seeds, squares = mean with 95 % CI")
    fig.savefig(path, dpi=90)


def plot_transfer(results: dict, path: Path) -> None:
    """Detection AP per backbone, scratch vs pretrained; bars = mean, error bars = 95 % CI over seeds (n >= 2)."""
    metric, cells, backbones = results["metric"], results["cells"], results["backbones"]
    fig = Figure(figsize=(max(5.0, 1.6 * len(backbones) + 2), 4), layout="constrained")
    ax = fig.subplots()
    width = 0.38
    for k, (pretrained, label, colour) in enumerate([(False, "from scratch", "tab:gray"),
                                                      (True, "classification-pretrained", "tab:blue")]):
        xs, means, errors = [], [], []
        for i, backbone in enumerate(backbones):
            values = [100 * c[metric] for c in cells if c["backbone"] == backbone and c["pretrained"] == pretrained
                      and c.get(metric) is not None]
            if values:
                s = summarize(values)
                xs.append(i + (k - 0.5) * width)
                means.append(s.mean)
                errors.append(0.0 if s.ci_high is None else s.ci_high - s.mean)
        ax.bar(xs, means, width, yerr=errors, capsize=4, label=label, color=colour)
    ax.set_ylim(bottom=0)
    ax.set_xticks(range(len(backbones)), backbones)
    ax.set(ylabel=f"{metric} (%)", title=f"Detection {metric}, mean over seeds {results['seeds']}\n(bars: 95 % CI)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


def mean_curve(histories: list[Path], key: str) -> list[tuple[int, float]]:
    """(iteration, mean over runs) of `key` in history.jsonl files, at iterations every run logged."""
    by_iteration: dict[int, list[float]] = defaultdict(list)
    for history in histories:
        for line in history.read_text().splitlines():
            record = json.loads(line) if line else {}
            if record.get(key) is not None:
                by_iteration[record["iteration"]].append(record[key])
    return [(it, sum(v) / len(v)) for it, v in sorted(by_iteration.items()) if len(v) == len(histories)]


def plot_degradation(runs: list[dict], path: Path) -> None:
    """The paper's Figures 4 / 6: classification error vs iteration, plain nets (left), ResNets (right), mean over
    seeds; dashed = training error (windowed over log_every iterations), bold = validation / test error.
    `runs`: {"net": name, "history": history.jsonl path} per run. A family with no run gets no panel."""
    nets = list(dict.fromkeys(r["net"] for r in runs))
    families = [f for f in ("plain", "resnet") if any(n.startswith(f) for n in nets)] or ["plain", "resnet"]
    fig = Figure(figsize=(5.5 * len(families), 4), layout="constrained")
    axes = fig.subplots(1, len(families), sharey=True, squeeze=False)[0]
    for ax, family in zip(axes, families):
        for k, net in enumerate(n for n in nets if n.startswith(family)):
            histories = [Path(r["history"]) for r in runs if r["net"] == net and Path(r["history"]).is_file()]
            colour = f"C{k}"
            for key, style, label in (("train/error", dict(ls="--", lw=1), "train"),
                                      ("val/error", dict(lw=2.5, marker="o", ms=3), "test")):
                curve = mean_curve(histories, key) if histories else []
                if curve:
                    ax.plot(*zip(*curve), color=colour, label=f"{net} {label}", **style)
        ax.set(xlabel="iteration", title="plain networks" if family == "plain" else "ResNets")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    axes[0].set_ylabel("error (%)")
    fig.suptitle("Mean over seeds: dashed = training error, bold = test error")
    fig.savefig(path, dpi=100)
