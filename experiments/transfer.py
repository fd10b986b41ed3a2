"""The transfer experiment's results (tools/transfer.py): its experiments in docs/reproduction.json's schema, the
orderings the paper predicts between them, and its Markdown page."""
from __future__ import annotations

import re

from .stages import format_duration
from .statistics import compare_pairs, experiment_record, statistics_markdown, summarize


def pretraining_experiments(classification: list[dict], variant: str | None = None) -> dict[str, dict]:
    """The pretrainings in docs/reproduction.json's schema: pretrain_top1 and pretrain_train_error (condition =
    backbone), each name ending in _<variant> when there is one. Values in percent."""
    experiments = {
        "pretrain_top1": experiment_record("classification val top-1 (%)", True,
                                           [(c["backbone"], c["seed"], c["top1"]) for c in classification]),
        "pretrain_train_error": experiment_record(
            "classification final training error (%, last epoch)", False,
            [(c["backbone"], c["seed"], None if c["train_top1"] is None else 100 - c["train_top1"])
             for c in classification]),
    }
    return _with_variant(experiments, variant)


def reproduction_experiments(results: dict, dataset: str, variant: str | None = None) -> dict[str, dict]:
    """The runs in docs/reproduction.json's schema: the pretrainings' (`pretraining_experiments`) and
    transfer_<dataset>_ap50 (+ _ap for COCO metrics) with conditions <backbone>_scratch / _pretrained,
    each name ending in _<variant> when there is one. Values in percent. AP50 is COCO's AP at IoU 0.5
    (101-point) with eval.metric=coco, else the VOC mAP."""
    coco = results["metric"] == "AP"
    experiments = {}
    keys = [("ap50", "AP50" if coco else "mAP", "COCO AP50 (%)" if coco else "VOC AP50 (%)")]
    if coco:
        keys.append(("ap", "AP", "COCO AP@[.5:.95] (%)"))
    for suffix, key, metric in keys:
        runs = [(f"{c['backbone']}_{'pretrained' if c['pretrained'] else 'scratch'}", c["seed"],
                 None if c.get(key) is None else 100 * c[key]) for c in results["cells"]]
        experiments[f"transfer_{dataset}_{suffix}"] = experiment_record(metric, True, runs)
    return {**pretraining_experiments(results["classification"], variant), **_with_variant(experiments, variant)}


def _with_variant(experiments: dict[str, dict], variant: str | None) -> dict[str, dict]:
    """Each experiment's name with `_<variant>` appended when there is a variant."""
    return {f"{name}_{variant}" if variant else name: experiment for name, experiment in experiments.items()}


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
    lines += ["", f"{len(cls)} classification and {len(cells)} detection runs, {format_duration(sum(walls))} of "
              "training in all."]
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
