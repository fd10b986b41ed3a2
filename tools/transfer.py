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
import json
import re
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))  # the sibling tools
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import train_cls  # noqa: E402
import train_det  # noqa: E402
from backbones.build import backbone_names  # noqa: E402
from engine.config import CONFIGS_DIR, ConfigError, config_or_exit, load_config  # noqa: E402
from engine.output import HISTORY  # noqa: E402
from experiments.figures import plot_degradation, plot_orderings, plot_transfer  # noqa: E402
from experiments.stages import format_duration, run_stage, tiny_imagenet_subset  # noqa: E402
from experiments.statistics import compare_pairs, condition_statistics, statistics_markdown, summarize  # noqa: E402

DEFAULT_CONFIG = CONFIGS_DIR / "transfer" / "default.yaml"


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
        print(f"[transfer] pretraining done in {format_duration(time.time() - start)}: {len(ran)} stage(s) run; detection "
              f"comes with the same command without --pretrain-only")
        return {"classification": classification, "stages_run": ran}
    metric = "AP" if "AP" in cells[0] else "mAP"
    results = {"metric": metric, "backbones": list(cfg.backbones), "seeds": list(cfg.seeds), "cells": cells,
               "classification": classification, "stages_run": ran, "wall_s": time.time() - start,
               "config": OmegaConf.to_container(cfg)}
    experiments = reproduction_experiments(results, cfg.det.name, cfg.variant)
    results.update(experiments=experiments, summaries=condition_statistics(experiments),
                   comparisons=comparisons(experiments, list(cfg.backbones)))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "reproduction.json").write_text(json.dumps({"experiments": experiments}, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    plot_transfer(results, out / "transfer.png")
    for experiment in (e for e in experiments if e.startswith("transfer_")):  # one figure per detection metric
        plot_orderings(results, experiment, out / f"orderings_{experiment}.png")
    plot_degradation([{"net": c["backbone"], "history": c["history"]} for c in classification], out / "degradation.png")
    print((out / "results.md").read_text())
    print(f"[transfer] done in {format_duration(time.time() - start)}: {len(ran)} stage(s) run; results in {out}")
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


def _argv(config: str | None, overrides: list[str]) -> list[str]:
    return ([f"--config={config}"] if config else []) + [str(o) for o in overrides]


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
    lines += ["", f"{len(cls)} classification and {len(cells)} detection runs, {format_duration(sum(walls))} of training in all."]
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


if __name__ == "__main__":
    main()
