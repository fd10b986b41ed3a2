"""Merge the reproduction.json files of several experiments into one (docs/reproduction.json).

    python tools/merge_reproduction.py --out docs/reproduction.json \
        outputs/transfer_raccoon/reproduction.json outputs/cifar_degradation/reproduction.json

Every input is `{"experiments": {NAME: {"metric", "higher_is_better", "runs": [{"condition", "seed", "value"}]}}}`
(tools/transfer.py's reproduction.json, or its pretraining.json with --pretrain-only; tools/cifar_degradation.py's
reproduction.json). An experiment found in several inputs (e.g. seeds run in separate output folders) has its runs
concatenated; its metric and direction must agree, and a (condition, seed) found twice must have the same value (it
is kept once: e.g. a pretraining shared by two transfer experiments). An existing --out file is not overwritten
without --overwrite.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge_reproduction(documents: list[dict]) -> dict:
    """One `{"experiments": ...}` document from several; raises ValueError on a conflict."""
    merged: dict[str, dict] = {}
    for document in documents:
        for name, experiment in document["experiments"].items():
            if name not in merged:
                merged[name] = {"metric": experiment["metric"], "higher_is_better": experiment["higher_is_better"],
                                "runs": []}
            target = merged[name]
            if (target["metric"], target["higher_is_better"]) != (experiment["metric"], experiment["higher_is_better"]):
                raise ValueError(f"experiment {name!r}: metric / direction {experiment['metric']!r}, "
                                 f"{experiment['higher_is_better']} differ from {target['metric']!r}, "
                                 f"{target['higher_is_better']} of an earlier input")
            seen = {(run["condition"], run["seed"]): run["value"] for run in target["runs"]}
            for run in experiment["runs"]:
                key = (run["condition"], run["seed"])
                if key in seen and seen[key] != run["value"]:
                    raise ValueError(f"experiment {name!r}: condition {run['condition']!r} seed {run['seed']} "
                                     f"has different values in two inputs ({seen[key]} and {run['value']})")
                if key not in seen:  # the same run twice (e.g. a shared pretraining) counts once
                    target["runs"].append({"condition": run["condition"], "seed": run["seed"], "value": run["value"]})
    return {"experiments": merged}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, help="reproduction.json files")
    parser.add_argument("--out", type=Path, required=True, help="the merged file, e.g. docs/reproduction.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists: pass --overwrite to replace it")
    try:
        merged = merge_reproduction([json.loads(path.read_text()) for path in args.inputs])
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        parser.error(str(e))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    counts = ", ".join(f"{name} ({len(e['runs'])} runs)" for name, e in merged["experiments"].items())
    print(f"wrote {args.out}: {counts}")
    return merged


if __name__ == "__main__":
    main()
