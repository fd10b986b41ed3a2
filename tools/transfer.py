"""The paper's transfer experiment at toy scale: pretrain backbones, fine-tune Faster R-CNN with and without them.

    python tools/transfer.py                                    # built-in demo: generated data, ~1 minute
    python tools/transfer.py --config configs/transfer/tiny_imagenet_coco128.yaml
    python tools/transfer.py --config ... seeds=[0] output_dir=outputs/transfer_one_seed

For every backbone x seed: (1) pretrain a classifier with tools/train_cls.py, (2) train Faster R-CNN with
tools/train_det.py from that classifier's backbone.pth AND from scratch (same schedule), (3) collect the metrics.
Both tools run in-process through their `main(argv)`, with overrides built from this config.

Each stage writes to `output_dir/<backbone>/seed<k>/{cls,det_pretrained,det_scratch}`; a stage whose
metrics.json exists is not redone (a stage with only last.pth is resumed), so rerunning the same command
continues an interrupted experiment. Writes to `output_dir`: results.json (every cell, the per-condition statistics
and the comparisons), results.md (mean, std and 95 % CI over seeds; pretrained - scratch and ResNet - plain with
Welch intervals and whether each ordering held), reproduction.json (the runs in docs/reproduction.json's schema,
see tools/merge_reproduction.py), transfer.png (detection AP with / without pretraining), orderings_<experiment>.png (one panel per ordering of a
detection metric: seeds, means, the Welch interval and whether the paper's ordering held), degradation.png (classification
training error of plain vs ResNet nets, the paper's Figure 4) and stages.log (one line per stage run or skipped).
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))  # the sibling tools
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import train_cls  # noqa: E402
import train_det  # noqa: E402
from backbones.build import backbone_names  # noqa: E402
from engine.config import CONFIGS_DIR, ConfigError, config_or_exit, load_config  # noqa: E402
from engine.output import HISTORY  # noqa: E402
from engine.stats import compare, summarize  # noqa: E402

DEFAULT_CONFIG = CONFIGS_DIR / "transfer" / "default.yaml"
METRICS = "metrics.json"
WALL_TIME = "wall_time.json"  # written by this script next to a stage's metrics.json
STAGE_LOG = "stages.log"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="transfer experiment YAML (may use _base_)")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="run the pretraining stages only (a study's long classification runs can start before "
                             "its detection settings are final); a later call without it does the rest")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, DEFAULT_CONFIG, args)
    unknown = sorted(set(cfg.per_backbone) - set(cfg.backbones))
    if unknown:
        parser.error(f"per_backbone names {unknown}, which are not in backbones {list(cfg.backbones)}")
    scratch = list(cfg.backbones) if cfg.scratch is None else list(cfg.scratch)
    if set(scratch) - set(backbone_names()):  # not checked against `backbones`: a call may run a subset of them
        parser.error(f"scratch names {sorted(set(scratch) - set(backbone_names()))}, which are not backbones")
    check_stage_configs(parser, cfg, scratch)  # a typo in a later stage must not cost the pretraining before it
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    start = time.time()
    ran: list[str] = []  # the stages this call actually trained (the rest were already done)

    cls_shared = [*cfg.cls.overrides]
    if cfg.cls.class_subset:  # pretrain on the first N classes only: a linked copy of the dataset's folder
        cls_data = load_config(train_cls.DEFAULT_CONFIG, cfg.cls.config, cls_shared).data
        subset = tiny_imagenet_subset(Path(cls_data.root), cfg.cls.class_subset, out / "data", cls_data.format)
        cls_shared.append(f"data.root={subset}")

    classification, cells = [], []
    for seed in cfg.seeds:  # seed-major: a run stopped early still has every backbone for the first seeds
        for backbone in cfg.backbones:
            extra = cfg.per_backbone.get(backbone, {})
            run_dir = out / backbone / f"seed{seed}"
            common = [f"model.backbone.name={backbone}", f"train.seed={seed}"]

            # (1) pretrain the classifier, export backbone.pth (once per backbone when cls.seed is set)
            cls_seed = seed if cfg.cls.seed is None else cfg.cls.seed
            cls_dir = run_dir / "cls" if cfg.cls.seed is None else out / backbone / f"pretrain_seed{cls_seed}"
            cls_argv = _argv(cfg.cls.config, [*cls_shared, *extra.get("cls", []), f"model.backbone.name={backbone}",
                                              f"train.seed={cls_seed}"])
            cls_metrics, cls_wall = run_stage(train_cls.main, cls_argv, cls_dir, out, start, ran)
            if not any(c["backbone"] == backbone and c["seed"] == cls_seed for c in classification):
                classification.append({"backbone": backbone, "seed": cls_seed, "top1": cls_metrics["top1"],
                                       "top5": cls_metrics.get("top5"), "train_top1": cls_metrics.get("train_top1"),
                                       "wall_s": cls_wall, "history": str(cls_dir / HISTORY)})
            if args.pretrain_only:
                continue

            # (2) + (3) detection from the pretrained backbone and from scratch (same schedule) where asked
            for pretrained in (True, False) if backbone in scratch else (True,):
                weights = str(cls_dir / "backbone.pth") if pretrained else "null"
                det_argv = _argv(cfg.det.config, [*cfg.det.overrides, *extra.get("det", []), *common,
                                                  f"model.backbone.weights={weights}"])
                det_dir = run_dir / ("det_pretrained" if pretrained else "det_scratch")
                det_metrics, det_wall = run_stage(train_det.main, det_argv, det_dir, out, start, ran)
                cells.append({"backbone": backbone, "seed": seed, "pretrained": pretrained,
                              **{k: v for k, v in det_metrics.items() if not isinstance(v, dict)},
                              "per_class": {k.removesuffix("_per_class"): v for k, v in det_metrics.items()
                                            if k.endswith("_per_class")},
                              "cls_top1": cls_metrics["top1"] if pretrained else None,
                              "cls_train_top1": cls_metrics.get("train_top1") if pretrained else None,
                              "cls_wall_s": cls_wall if pretrained else None, "det_wall_s": det_wall})

    if args.pretrain_only:
        print(f"[transfer] pretraining done in {fmt(time.time() - start)}: {len(ran)} stage(s) run; detection "
              f"comes with the same command without --pretrain-only")
        return {"classification": classification, "stages_run": ran}
    metric = "AP" if "AP" in cells[0] else "mAP"
    results = {"metric": metric, "backbones": list(cfg.backbones), "seeds": list(cfg.seeds), "cells": cells,
               "classification": classification, "stages_run": ran, "wall_s": time.time() - start,
               "config": OmegaConf.to_container(cfg)}
    experiments = reproduction_experiments(results, cfg.det.name, cfg.variant)
    results.update(experiments=experiments, summaries=summaries(experiments),
                   comparisons=comparisons(experiments, list(cfg.backbones)))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "reproduction.json").write_text(json.dumps({"experiments": experiments}, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    plot_transfer(results, out / "transfer.png")
    for experiment in (e for e in experiments if e.startswith("transfer_")):  # one figure per detection metric
        plot_orderings(results, experiment, out / f"orderings_{experiment}.png")
    plot_degradation([{"net": c["backbone"], "history": c["history"]} for c in classification], out / "degradation.png")
    print((out / "results.md").read_text())
    print(f"[transfer] done in {fmt(time.time() - start)}: {len(ran)} stage(s) run; results in {out}")
    return results


def check_stage_configs(parser: argparse.ArgumentParser, cfg, scratch: list[str]) -> None:
    """Load every stage's config (pretraining and detection, per backbone) as the stages will, so a bad key or
    value in any of them stops the study before its first stage runs; `parser.error` names the stage."""
    for backbone in cfg.backbones:
        extra = cfg.per_backbone.get(backbone, {})
        common = [f"model.backbone.name={backbone}", f"train.seed={cfg.seeds[0]}"]
        stages = [("pretraining", train_cls.DEFAULT_CONFIG, cfg.cls.config, [*cfg.cls.overrides, *extra.get("cls", []),
                                                                            *common])]
        for weights in ("pretrained.pth", None) if backbone in scratch else ("pretrained.pth",):
            stages.append((f"detection ({'pretrained' if weights else 'scratch'})", train_det.DEFAULT_CONFIG,
                           cfg.det.config, [*cfg.det.overrides, *extra.get("det", []), *common,
                                            f"model.backbone.weights={weights or 'null'}"]))
        for stage, default, config, overrides in stages:
            try:
                load_config(default, config, [str(o) for o in overrides])
            except (ConfigError, FileNotFoundError) as err:
                parser.error(f"{backbone} {stage} stage: {err}")


def tiny_imagenet_subset(root: Path, num_classes: int, parent: Path, fmt: str) -> Path:
    """`parent/<root name>-<N>cls`: a Tiny-ImageNet folder of the first N (sorted) classes of `root`, made of
    symlinks (train class folders, val images) plus the filtered wnids.txt and val_annotations.txt."""
    if fmt != "tiny-imagenet":
        raise ValueError(f"cls.class_subset needs data.format=tiny-imagenet, got {fmt!r}")
    wnids = sorted((root / "wnids.txt").read_text().split())[:num_classes]
    dst = parent / f"{root.resolve().name}-{num_classes}cls"
    if (dst / "wnids.txt").is_file() and (dst / "wnids.txt").read_text().split() == wnids:
        return dst
    (dst / "val").mkdir(parents=True, exist_ok=True)
    (dst / "train").mkdir(exist_ok=True)
    for wnid in wnids:
        if not (dst / "train" / wnid).exists():
            (dst / "train" / wnid).symlink_to((root / "train" / wnid).resolve(), target_is_directory=True)
    if not (dst / "val" / "images").exists():
        (dst / "val" / "images").symlink_to((root / "val" / "images").resolve(), target_is_directory=True)
    lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
    kept = [line for line in lines if len(line.split("\t")) > 1 and line.split("\t")[1] in wnids]
    (dst / "val" / "val_annotations.txt").write_text("\n".join(kept) + "\n")
    (dst / "wnids.txt").write_text("\n".join(wnids) + "\n")  # last: marks the copy complete
    return dst


def _argv(config: str | None, overrides: list[str]) -> list[str]:
    return ([f"--config={config}"] if config else []) + [str(o) for o in overrides]


def run_stage(tool_main, argv: list[str], stage_dir: Path, out: Path, start: float, ran: list[str], *,
              tag: str = "transfer", log_name: str = STAGE_LOG) -> tuple[dict, float | None]:
    """Run one training tool into `stage_dir` unless its metrics.json exists (resuming it when it holds a
    checkpoint); return (metrics, wall seconds of the run). Progress lines go to stdout and `out/log_name`."""
    def log(line: str) -> None:
        line = f"[{tag} {fmt(time.time() - start)}] {stage_dir.relative_to(out)}: {line}"
        print(line, flush=True)
        with open(out / log_name, "a") as f:
            f.write(line + "\n")

    if (stage_dir / METRICS).is_file():
        metrics = json.loads((stage_dir / METRICS).read_text())
        wall = json.loads((stage_dir / WALL_TIME).read_text())["seconds"] if (stage_dir / WALL_TIME).is_file() else None
        log("done before, skipped")
        return metrics, wall
    argv = ["--resume", "auto", *argv, f"output_dir={stage_dir}"]  # interrupted mid-stage: continue where it stopped
    log(f"running {' '.join(argv)}")
    t0 = time.time()
    metrics = tool_main(argv)
    wall = time.time() - t0
    (stage_dir / WALL_TIME).write_text(json.dumps({"seconds": wall}) + "\n")
    ran.append(str(stage_dir.relative_to(out)))
    gc.collect()
    log(f"finished in {fmt(wall)}")
    return metrics, wall


def fmt(seconds: float) -> str:
    """`12m03.4s`."""
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def reproduction_experiments(results: dict, dataset: str, variant: str | None = None) -> dict[str, dict]:
    """The runs in docs/reproduction.json's schema: pretrain_top1 / pretrain_train_error (condition = backbone)
    and transfer_<dataset>_ap50 (+ _ap for COCO metrics) with conditions <backbone>_scratch / _pretrained,
    each name ending in _<variant> when there is one. Values in percent. AP50 is COCO's AP at IoU 0.5
    (101-point) with eval.metric=coco, else the VOC mAP."""
    coco = results["metric"] == "AP"
    experiments = {
        "pretrain_top1": _experiment("classification val top-1 (%)", True,
                                     [(c["backbone"], c["seed"], c["top1"]) for c in results["classification"]]),
        "pretrain_train_error": _experiment(
            "classification final training error (%, last epoch)", False,
            [(c["backbone"], c["seed"], None if c["train_top1"] is None else 100 - c["train_top1"])
             for c in results["classification"]]),
    }
    keys = [("ap50", "AP50" if coco else "mAP", "COCO AP50 (%)" if coco else "VOC AP50 (%)")]
    if coco:
        keys.append(("ap", "AP", "COCO AP@[.5:.95] (%)"))
    for suffix, key, metric in keys:
        runs = [(f"{c['backbone']}_{'pretrained' if c['pretrained'] else 'scratch'}", c["seed"],
                 None if c.get(key) is None else 100 * c[key]) for c in results["cells"]]
        experiments[f"transfer_{dataset}_{suffix}"] = _experiment(metric, True, runs)
    return {f"{name}_{variant}" if variant else name: experiment for name, experiment in experiments.items()}


def _experiment(metric: str, higher_is_better: bool, runs: list[tuple[str, int, float | None]]) -> dict:
    return {"metric": metric, "higher_is_better": higher_is_better,
            "runs": [{"condition": c, "seed": s, "value": v} for c, s, v in runs if v is not None]}


def _values(experiment: dict, condition: str) -> list[float]:
    return [run["value"] for run in experiment["runs"] if run["condition"] == condition]


def summaries(experiments: dict[str, dict]) -> list[dict]:
    """Mean, sample std and 95 % t interval per experiment x condition (conditions in first-seen order)."""
    rows = []
    for name, experiment in experiments.items():
        for condition in dict.fromkeys(run["condition"] for run in experiment["runs"]):
            rows.append({"experiment": name, "condition": condition,
                         **summarize(_values(experiment, condition)).to_dict()})
    return rows


def comparisons(experiments: dict[str, dict], backbones: list[str]) -> list[dict]:
    """The paper's orderings, A - B with a Welch 95 % interval: pretrained - scratch per backbone (detection),
    ResNet - plain per depth (pretraining and detection, each initialisation), and deeper - shallower within each
    family (pretraining and detection): the paper's Figure 4 / Table 2 expect a deeper ResNet to be better and a
    deeper plain net not to be (its degradation problem). `held`: the interval excludes 0 on the side where A is
    better; `paper`: the ordering the paper predicts, 'A > B' or 'A <= B'; `agrees`: the result does not
    contradict it ('A > B' held, or for 'A <= B' the interval does not lie on A's better side)."""
    pairs = []  # (experiment, condition A, condition B, paper)
    for name in experiments:
        if name.startswith("transfer_"):
            pairs += [(name, f"{b}_pretrained", f"{b}_scratch", "A > B") for b in backbones]
    for resnet in backbones:
        plain = re.sub(r"^resnet(\d+)$", r"plain\1", resnet)
        if plain == resnet or plain not in backbones:
            continue
        for name in experiments:
            if name.startswith("pretrain_"):
                pairs.append((name, resnet, plain, "A > B"))
            else:
                pairs += [(name, f"{resnet}_{init}", f"{plain}_{init}", "A > B") for init in ("pretrained", "scratch")]
    for family, paper in (("resnet", "A > B"), ("plain", "A <= B")):
        depths = sorted(int(m.group(1)) for b in backbones if (m := re.fullmatch(rf"{family}(\d+)", b)))
        for shallow, deep in zip(depths, depths[1:]):
            a, b = f"{family}{deep}", f"{family}{shallow}"
            for name in experiments:
                if name.startswith("pretrain_"):
                    pairs.append((name, a, b, paper))
                else:
                    pairs += [(name, f"{a}_{init}", f"{b}_{init}", paper) for init in ("pretrained", "scratch")]
    return compare_pairs(experiments, pairs)


def compare_pairs(experiments: dict[str, dict], pairs: list[tuple]) -> list[dict]:
    """For each (experiment, A, B[, paper]) with runs on both sides: A - B with its Welch 95 % interval, `held`
    (A better than B in the experiment's direction, the interval excluding 0), and with a `paper` ordering
    ('A > B', the default, or 'A <= B') whether the result `agrees` with it."""
    rows = []
    for name, a, b, *paper in pairs:
        experiment = experiments[name]
        values_a, values_b = _values(experiment, a), _values(experiment, b)
        if values_a and values_b:
            comparison = compare(values_a, values_b, higher_is_better=experiment["higher_is_better"])
            expected = paper[0] if paper else "A > B"
            agrees = comparison.held if expected == "A > B" else not comparison.held
            rows.append({"experiment": name, "a": a, "b": b, **comparison.to_dict(), "paper": expected,
                         "agrees": agrees})
    return rows


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _interval(low: float | None, high: float | None) -> str:
    return "n/a" if low is None else f"[{low:.2f}, {high:.2f}]"


def statistics_markdown(summary_rows: list[dict], comparison_rows: list[dict]) -> list[str]:
    """Two Markdown tables: per-condition statistics, then the comparisons and whether each ordering held."""
    lines = ["| experiment | condition | n | mean | std | 95% CI |", "|---|---|---:|---:|---:|---|"]
    for row in summary_rows:
        lines.append(f"| {row['experiment']} | {row['condition']} | {row['n']} | {row['mean']:.2f} | "
                     f"{_num(row['std'])} | {_interval(row['ci_low'], row['ci_high'])} |")
    lines += ["", "Orderings: A − B, difference of means with its 95 % Welch interval; *held* = the interval "
              "excludes 0 on the side where A is better (higher, or lower for errors); *paper* = the ordering the "
              "paper predicts (A ≤ B for a deeper plain net: its degradation) and whether this result agrees.", "",
              "| experiment | A − B | difference | 95% CI | held | paper | agrees |", "|---|---|---:|---|---|---|---|"]
    for row in comparison_rows:
        lines.append(f"| {row['experiment']} | {row['a']} − {row['b']} | {row['diff']:+.2f} | "
                     f"{_interval(row['ci_low'], row['ci_high'])} | {'yes' if row['held'] else 'no'} | "
                     f"{row.get('paper', 'A > B').replace('<=', '≤')} | "
                     f"{'yes' if row.get('agrees', row['held']) else 'no'} |")
    return lines


def results_markdown(results: dict) -> str:
    experiments = results["experiments"]
    lines = [f"# Transfer: {len(results['backbones'])} backbone(s) x seeds {results['seeds']}",
             "",
             "Per condition over seeds: mean, sample standard deviation and the 95 % confidence interval of the "
             "mean (Student t), in percent. Detection from scratch vs from the backbone pretrained by classification "
             "(same schedule); " + ", ".join(f"`{n}`: {e['metric']}" for n, e in experiments.items()) + ".",
             "",
             *statistics_markdown(results["summaries"], results["comparisons"])]
    cls, cells = results["classification"], results["cells"]
    lines += ["", *per_class_markdown(cells)]
    walls = [c["wall_s"] for c in cls if c["wall_s"]] + [c["det_wall_s"] for c in cells if c["det_wall_s"]]
    lines += ["", f"{len(cls)} classification and {len(cells)} detection runs, {fmt(sum(walls))} of training in all."]
    return "\n".join(lines) + "\n"


def per_class_markdown(cells: list[dict]) -> list[str]:
    """Per-class detection AP (%) per condition: mean ± std over seeds, AP50 then AP@[.5:.95] for each class."""
    classes = list(dict.fromkeys(name for c in cells for name in (c.get("per_class") or {}).get("AP50", {})))
    if not classes:
        return []
    lines = ["Per class (mean ± std over seeds, %):", "",
             "| condition | n | " + " | ".join(f"{k} AP50 | {k} AP" for k in classes) + " |",
             "|---|---:|" + "---:|" * (2 * len(classes))]
    conditions = dict.fromkeys((c["backbone"], c["pretrained"]) for c in cells)
    for backbone, pretrained in conditions:
        runs = [c["per_class"] for c in cells if (c["backbone"], c["pretrained"]) == (backbone, pretrained)]
        values = []
        for name in classes:
            for metric in ("AP50", "AP"):
                seeds = [100 * r[metric][name] for r in runs if r.get(metric, {}).get(name) is not None]
                s = summarize(seeds) if seeds else None
                values.append("n/a" if s is None else f"{s.mean:.1f} ± {0.0 if s.std is None else s.std:.1f}")
        lines.append(f"| {backbone}_{'pretrained' if pretrained else 'scratch'} | {len(runs)} | "
                     + " | ".join(values) + " |")
    return lines


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
    for ax, row in zip(fig.subplots((len(rows) + columns - 1) // columns, columns, squeeze=False).flat, rows):
        for x, condition in enumerate((row["a"], row["b"])):
            values = _values(experiments[row["experiment"]], condition)
            s = summarize(values)
            ax.plot([x] * len(values), values, "o", color=f"C{x}", alpha=0.6)
            ax.errorbar([x + 0.15], [s.mean], yerr=[[s.mean - (s.ci_low if s.ci_low is not None else s.mean)],
                                                    [(s.ci_high if s.ci_high is not None else s.mean) - s.mean]],
                        fmt="s", color=f"C{x}", capsize=4)
        ax.set_xticks([0, 1], [row["a"], row["b"]], fontsize=8)
        ax.set_xlim(-0.5, 1.6)
        ax.set_ylabel(metric)
        ax.set_title(f"A − B = {row['diff']:+.1f} {_interval(row['ci_low'], row['ci_high'])}\n"
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


def _mean_curve(histories: list[Path], key: str) -> list[tuple[int, float]]:
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
    `runs`: {"net": name, "history": history.jsonl path} per run."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    nets = list(dict.fromkeys(r["net"] for r in runs))
    for ax, family in zip(axes, ("plain", "resnet")):
        for k, net in enumerate(n for n in nets if n.startswith(family)):
            histories = [Path(r["history"]) for r in runs if r["net"] == net and Path(r["history"]).is_file()]
            colour = f"C{k}"
            for key, style, label in (("train/error", dict(ls="--", lw=1), "train"),
                                      ("val/error", dict(lw=2.5, marker="o", ms=3), "test")):
                curve = _mean_curve(histories, key) if histories else []
                if curve:
                    ax.plot(*zip(*curve), color=colour, label=f"{net} {label}", **style)
        ax.set(xlabel="iteration", title="plain networks" if family == "plain" else "ResNets")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    axes[0].set_ylabel("error (%)")
    fig.suptitle("Mean over seeds: dashed = training error, bold = test error")
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
