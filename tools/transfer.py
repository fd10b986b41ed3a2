"""The paper's transfer experiment at toy scale: pretrain backbones, fine-tune Faster R-CNN with and without them.

    python tools/transfer.py                                    # built-in demo: generated data, ~1 minute
    python tools/transfer.py --config configs/transfer/tiny_imagenet_coco128.yaml
    python tools/transfer.py --config ... seeds=[0] output_dir=outputs/transfer_one_seed

For every backbone x seed: (1) pretrain a classifier with tools/train_cls.py, (2) train Faster R-CNN with
tools/train_det.py from that classifier's backbone.pth AND from scratch (same schedule), (3) collect the metrics.
Both tools run as child processes (experiments.stages.run_tool), with overrides built from this config.

Each stage writes to `output_dir/<backbone>/seed<k>/{cls,det_pretrained,det_scratch}`; a stage whose metrics.json
exists is not redone (a stage with only last.pth is resumed), so rerunning the same command continues an interrupted
experiment. The same command started twice (one process per core, or per node on a shared file system) shares the
stages: each passes over a stage the other is training (its run folder's lock) and, when only those are left,
stops with exit status 73; the one that ends last writes the results. With --pretrain-only: pretraining.json (each
pretraining's top-1 / top-5, training top-1, wall time, and their experiments in docs/reproduction.json's schema)
and degradation.png. Otherwise writes to `output_dir`:
results.json (every cell, the per-condition statistics and the comparisons), results.md (mean, std and 95 % CI over
seeds; pretrained - scratch and ResNet - plain with Welch intervals and whether each ordering held),
reproduction.json (the runs in docs/reproduction.json's schema, see tools/merge_reproduction.py), transfer.png
(detection AP with / without pretraining), orderings_<experiment>.png (one panel per ordering of a detection metric:
seeds, means, the Welch interval and whether the paper's ordering held), degradation.png (classification training
error of plain vs ResNet nets, the paper's Figure 4) and stages.log (one line per stage run or skipped).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from backbones.build import backbone_names  # noqa: E402
from classification.build import DEFAULT_CONFIG as CLS_DEFAULT_CONFIG  # noqa: E402
from detection.build import DEFAULT_CONFIG as DET_DEFAULT_CONFIG  # noqa: E402
from engine.config import CONFIGS_DIR, ConfigError, config_or_exit, load_config  # noqa: E402
from engine.output import HISTORY  # noqa: E402
from engine.run_lock import EXIT_IN_USE  # noqa: E402
from experiments.figures import plot_degradation, plot_orderings, plot_transfer  # noqa: E402
from experiments.stages import (StageInUse, format_duration, run_stage,  # noqa: E402
                                tiny_imagenet_subset)
from experiments.statistics import condition_statistics  # noqa: E402
from experiments.transfer import (comparisons, pretraining_experiments, reproduction_experiments,  # noqa: E402
                                  results_markdown)

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
        cls_data = load_config(CLS_DEFAULT_CONFIG, cfg.cls.config, cls_shared).data
        subset = tiny_imagenet_subset(Path(cls_data.root), cfg.cls.class_subset, out / "data", cls_data.format)
        cls_shared.append(f"data.root={subset}")

    while True:  # passes over the stages until none is left to another process, or only such are left
        ran_before = len(ran)
        classification, cells, in_use = run_stages(cfg, args.pretrain_only, scratch, cls_shared, out, start, ran)
        if not in_use:
            break
        if len(ran) == ran_before:  # the rest is another process's: the last one to end collects the results
            print(f"[transfer] {len(in_use)} stage(s) in use by another process of this study "
                  f"({', '.join(str(p.relative_to(out)) for p in in_use)}): left to it; whichever process ends last "
                  "writes the results (or run this command again then)")
            raise SystemExit(EXIT_IN_USE)

    degradation = [{"net": c["backbone"], "history": c["history"]} for c in classification]
    if args.pretrain_only:  # the pretrainings' own record and Figure 4, before any detection stage exists
        # "experiments" makes the file an input of tools/merge_reproduction.py as it is
        pretraining = {"classification": classification, "stages_run": ran,
                       "experiments": pretraining_experiments(classification, cfg.variant)}
        (out / "pretraining.json").write_text(json.dumps(pretraining, indent=2) + "\n")
        plot_degradation(degradation, out / "degradation.png")
        print(f"[transfer] pretraining done in {format_duration(time.time() - start)}: {len(ran)} stage(s) run; "
              "pretraining.json and degradation.png written; detection comes with the same command without "
              "--pretrain-only")
        return pretraining
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
    plot_degradation(degradation, out / "degradation.png")
    print((out / "results.md").read_text())
    print(f"[transfer] done in {format_duration(time.time() - start)}: {len(ran)} stage(s) run; results in {out}")
    return results


def run_stages(cfg, pretrain_only: bool, scratch: list[str], cls_shared: list[str], out: Path, start: float,
               ran: list[str]) -> tuple[list[dict], list[dict], list[Path]]:
    """One pass over the study's stages, seed-major (a run stopped early still has every backbone for the first
    seeds): (classification rows, detection cells, the stages another process is training). A stage another
    process is training is passed over, and with a pretraining the detection stages that need it: so the same
    command on each core shares the study."""
    classification, cells, in_use = [], [], []
    for seed in cfg.seeds:
        for backbone in cfg.backbones:
            extra = cfg.per_backbone.get(backbone, {})
            run_dir = out / backbone / f"seed{seed}"
            common = [f"model.backbone.name={backbone}", f"train.seed={seed}"]

            # (1) pretrain the classifier, export backbone.pth (once per backbone when cls.seed is set)
            cls_seed = seed if cfg.cls.seed is None else cfg.cls.seed
            cls_dir = run_dir / "cls" if cfg.cls.seed is None else out / backbone / f"pretrain_seed{cls_seed}"
            cls_argv = _argv(cfg.cls.config, [*cls_shared, *extra.get("cls", []), f"model.backbone.name={backbone}",
                                              f"train.seed={cls_seed}"])
            try:
                cls_metrics, cls_wall = run_stage("train_cls", cls_argv, cls_dir, out, start, ran)
            except StageInUse as busy:  # with cls.seed set, every seed meets the same pretraining
                if busy.stage_dir not in in_use:
                    in_use.append(busy.stage_dir)
                continue
            if not any(c["backbone"] == backbone and c["seed"] == cls_seed for c in classification):
                classification.append({"backbone": backbone, "seed": cls_seed, "top1": cls_metrics["top1"],
                                       "top5": cls_metrics.get("top5"), "train_top1": cls_metrics.get("train_top1"),
                                       "wall_s": cls_wall, "history": str(cls_dir / HISTORY)})
            if pretrain_only:
                continue

            # (2) + (3) detection from the pretrained backbone and from scratch (same schedule) where asked
            for pretrained in (True, False) if backbone in scratch else (True,):
                weights = str(cls_dir / "backbone.pth") if pretrained else "null"
                det_argv = _argv(cfg.det.config, [*cfg.det.overrides, *extra.get("det", []), *common,
                                                  f"model.backbone.weights={weights}"])
                det_dir = run_dir / ("det_pretrained" if pretrained else "det_scratch")
                try:
                    det_metrics, det_wall = run_stage("train_det", det_argv, det_dir, out, start, ran)
                except StageInUse as busy:
                    in_use.append(busy.stage_dir)
                    continue
                cells.append({"backbone": backbone, "seed": seed, "pretrained": pretrained,
                              **{k: v for k, v in det_metrics.items() if not isinstance(v, dict)},
                              "per_class": {k.removesuffix("_per_class"): v for k, v in det_metrics.items()
                                            if k.endswith("_per_class")},
                              "cls_top1": cls_metrics["top1"] if pretrained else None,
                              "cls_train_top1": cls_metrics.get("train_top1") if pretrained else None,
                              "cls_wall_s": cls_wall if pretrained else None, "det_wall_s": det_wall})
    return classification, cells, in_use


def check_stage_configs(parser: argparse.ArgumentParser, cfg, scratch: list[str]) -> None:
    """Load every stage's config (pretraining and detection, per backbone) as the stages will, so a bad key or
    value in any of them stops the study before its first stage runs; `parser.error` names the stage."""
    for backbone in cfg.backbones:
        extra = cfg.per_backbone.get(backbone, {})
        common = [f"model.backbone.name={backbone}", f"train.seed={cfg.seeds[0]}"]
        stages = [("pretraining", CLS_DEFAULT_CONFIG, cfg.cls.config, [*cfg.cls.overrides, *extra.get("cls", []),
                                                                            *common])]
        for weights in ("pretrained.pth", None) if backbone in scratch else ("pretrained.pth",):
            stages.append((f"detection ({'pretrained' if weights else 'scratch'})", DET_DEFAULT_CONFIG,
                           cfg.det.config, [*cfg.det.overrides, *extra.get("det", []), *common,
                                            f"model.backbone.weights={weights or 'null'}"]))
        for stage, default, config, overrides in stages:
            try:
                load_config(default, config, [str(o) for o in overrides])
            except (ConfigError, FileNotFoundError) as err:
                parser.error(f"{backbone} {stage} stage: {err}")


def _argv(config: str | None, overrides: list[str]) -> list[str]:
    return ([f"--config={config}"] if config else []) + [str(o) for o in overrides]


if __name__ == "__main__":
    main()
