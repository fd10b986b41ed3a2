"""tools/cifar_degradation.py: seeds x nets through train_cls in-process, results, reproduction.json, resume;
tools/merge_reproduction.py: merging such files."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import cifar_degradation  # noqa: E402
import merge_reproduction  # noqa: E402


def test_two_nets_two_seeds_then_resume(tmp_path):
    out = tmp_path / "degradation"
    argv = ["--config", str(ROOT / "configs" / "cls" / "default.yaml"), "--nets", "plain20", "resnet20",
            "--seeds", "0", "1", "--output-dir", str(out),
            "data.synthetic.enabled=true", f"data.root={tmp_path / 'shapes'}", "data.image_size=32", "data.recipe=cifar", "data.train_limit=16",
            "data.val_limit=8", "data.num_workers=0", "train.batch_size=8", "train.iters=2", "train.warmup_iters=0",
            "train.log_every=1", "eval.every=1"]
    results = cifar_degradation.main(argv)
    assert results["runs_done"] == ["plain20/seed0", "resnet20/seed0", "plain20/seed1", "resnet20/seed1"]
    config = (out / "resnet20" / "seed1" / "config.yaml").read_text()
    assert "name: resnet20" in config and "seed: 1" in config and "recipe: cifar" in config

    experiments = json.loads((out / "reproduction.json").read_text())["experiments"]
    assert set(experiments) == {"cifar_degradation_train_error", "cifar_test_error"}
    for experiment in experiments.values():
        assert experiment["higher_is_better"] is False and isinstance(experiment["metric"], str)
        assert sorted((r["condition"], r["seed"]) for r in experiment["runs"]) == [
            ("plain20", 0), ("plain20", 1), ("resnet20", 0), ("resnet20", 1)]
        assert all(0 <= r["value"] <= 100 for r in experiment["runs"])
    metrics = json.loads((out / "plain20" / "seed1" / "metrics.json").read_text())
    test_errors = {(r["condition"], r["seed"]): r["value"] for r in experiments["cifar_test_error"]["runs"]}
    assert test_errors[("plain20", 1)] == pytest.approx(100 - metrics["top1"])
    assert [(c["a"], c["b"]) for c in results["comparisons"]] == [("resnet20", "plain20")] * 2
    assert "| cifar_test_error | resnet20 − plain20 |" in (out / "results.md").read_text()
    assert (out / "degradation.png").stat().st_size > 1000

    again = cifar_degradation.main(argv)  # everything done: nothing retrained, same numbers
    assert again["runs_done"] == [] and again["summaries"] == results["summaries"]
    assert (out / "runs.log").read_text().count("done before, skipped") == 4


def test_orderings_follow_the_paper():
    assert cifar_degradation.orderings(["plain20", "plain56", "resnet20", "resnet56", "resnet32"]) == [
        ("plain20", "plain56"), ("resnet32", "resnet20"), ("resnet56", "resnet32"),
        ("resnet20", "plain20"), ("resnet56", "plain56")]


def test_merge_reproduction(tmp_path):
    run = lambda c, s, v: {"condition": c, "seed": s, "value": v}  # noqa: E731
    a = {"experiments": {"cifar_test_error": {"metric": "err", "higher_is_better": False, "runs": [run("plain20", 0, 9.0)]}}}
    b = {"experiments": {"cifar_test_error": {"metric": "err", "higher_is_better": False, "runs": [run("plain20", 1, 8.0)]},
                         "pretrain_top1": {"metric": "top1", "higher_is_better": True, "runs": [run("resnet18", 0, 11.2)]}}}
    paths = []
    for k, doc in enumerate((a, b)):
        paths.append(tmp_path / f"in{k}.json")
        paths[-1].write_text(json.dumps(doc))
    merged = merge_reproduction.main([*map(str, paths), "--out", str(tmp_path / "docs" / "reproduction.json")])
    assert [r["seed"] for r in merged["experiments"]["cifar_test_error"]["runs"]] == [0, 1]
    assert json.loads((tmp_path / "docs" / "reproduction.json").read_text()) == merged
    with pytest.raises(SystemExit):  # no silent overwrite
        merge_reproduction.main([str(paths[0]), "--out", str(tmp_path / "docs" / "reproduction.json")])
    assert merge_reproduction.merge_reproduction([a, a]) == a  # the same run twice counts once
    changed = {"experiments": {"cifar_test_error": {**a["experiments"]["cifar_test_error"], "runs": [run("plain20", 0, 7.0)]}}}
    with pytest.raises(ValueError, match="seed 0 has different values"):
        merge_reproduction.merge_reproduction([a, changed])
    clash = {"experiments": {"cifar_test_error": {**a["experiments"]["cifar_test_error"], "higher_is_better": True}}}
    with pytest.raises(ValueError, match="differ"):
        merge_reproduction.merge_reproduction([a, clash])


def test_degradation_figure_has_a_panel_per_family_present(tmp_path):
    """ResNets alone (a depth study of two ResNets) get one panel, not an empty plain-net one beside it."""
    from matplotlib.image import imread

    from experiments.figures import plot_degradation

    history = tmp_path / "history.jsonl"
    history.write_text("\n".join(json.dumps({"iteration": i, "train/error": 90.0 - i, "val/error": 95.0 - i})
                                 for i in (10, 20, 30)))
    widths = {}
    for name, nets in (("resnets", ["resnet18", "resnet34"]), ("both", ["plain18", "resnet18"])):
        plot_degradation([{"net": n, "history": str(history)} for n in nets], tmp_path / f"{name}.png")
        widths[name] = imread(tmp_path / f"{name}.png").shape[1]
    assert widths == {"resnets": 550, "both": 1100}
