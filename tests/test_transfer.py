"""tools/transfer.py: the whole pretrain -> detect (pretrained and scratch) pipeline, its outputs and its resume."""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "transfer" / "default.yaml"
sys.path.insert(0, str(ROOT / "tools"))

import transfer  # noqa: E402
from classification.datasets import build_cls_dataset  # noqa: E402
import experiments.stages as stages  # noqa: E402
from experiments.stages import tiny_imagenet_subset  # noqa: E402
from engine.run_lock import EXIT_IN_USE  # noqa: E402
from experiments.statistics import compare_pairs, condition_statistics  # noqa: E402
from experiments.transfer import comparisons, reproduction_experiments, results_markdown  # noqa: E402


def _default_config(tmp_path: Path) -> Path:
    """configs/transfer/default.yaml with its generated data written under tmp_path instead of the shared .cache/."""
    default = yaml.safe_load(DEFAULT.read_text())
    config = {
        "_base_": str(DEFAULT),
        "cls": {"overrides": [*default["cls"]["overrides"], f"data.root={tmp_path / 'cls_shapes'}"]},
        "det": {"overrides": [*default["det"]["overrides"], f"data.root={tmp_path / 'shapes'}"]},
        "output_dir": str(tmp_path / "transfer"),
    }
    path = tmp_path / "transfer.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_transfer_runs_end_to_end_then_resumes_without_redoing(tmp_path):
    config = _default_config(tmp_path)
    out = tmp_path / "transfer"
    pretraining = transfer.main(["--config", str(config), "--pretrain-only"])  # Figure 4 before any detection
    assert pretraining["stages_run"] == ["resnet18/seed0/cls", "plain18/seed0/cls"]
    assert json.loads((out / "pretraining.json").read_text()) == pretraining
    assert (out / "degradation.png").stat().st_size > 1000 and not (out / "results.json").exists()
    assert set(pretraining["experiments"]) == {"pretrain_top1", "pretrain_train_error"}
    results = transfer.main(["--config", str(config)])

    stages = [f"{b}/seed0/{s}" for b in ("resnet18", "plain18") for s in ("det_pretrained", "det_scratch")]
    assert results["stages_run"] == stages
    assert results["classification"] == pretraining["classification"]
    saved = json.loads((out / "results.json").read_text())
    cells = {(c["backbone"], c["seed"], c["pretrained"]): c for c in saved["cells"]}
    assert set(cells) == {(b, 0, p) for b in ("resnet18", "plain18") for p in (True, False)}
    for (backbone, _, pretrained), cell in cells.items():
        assert 0.0 <= cell["AP"] <= 1.0 and "AP50" in cell and cell["det_wall_s"] > 0
        assert (cell["cls_top1"] is not None) == pretrained and (cell["cls_train_top1"] is not None) == pretrained
        det_cfg = yaml.safe_load((out / backbone / "seed0" / ("det_pretrained" if pretrained else "det_scratch")
                                  / "config.yaml").read_text())
        assert det_cfg["model"]["backbone"]["name"] == backbone
        assert (det_cfg["model"]["backbone"]["weights"] is not None) == pretrained
    assert [(c["backbone"], c["seed"]) for c in saved["classification"]] == [("resnet18", 0), ("plain18", 0)]
    assert all(0 <= c["top1"] <= 100 and c["wall_s"] > 0 for c in saved["classification"])
    table = (out / "results.md").read_text()
    assert "| transfer_shapes_ap | resnet18_pretrained | 1 |" in table and "| pretrain_top1 | plain18 | 1 |" in table
    assert "| transfer_shapes_ap50 | resnet18_pretrained − resnet18_scratch |" in table
    assert "| condition | n | circle AP50 | circle AP |" in table and "| plain18_scratch | 1 |" in table
    assert {p.name for p in out.glob("orderings_*.png")} == {"orderings_transfer_shapes_ap.png",
                                                            "orderings_transfer_shapes_ap50.png"}

    # reproduction.json: docs/reproduction.json's schema, one run per condition x seed, values in percent
    reproduction = json.loads((out / "reproduction.json").read_text())
    assert set(reproduction) == {"experiments"}
    experiments = reproduction["experiments"]
    assert set(experiments) == {"pretrain_top1", "pretrain_train_error", "transfer_shapes_ap50", "transfer_shapes_ap"}
    for experiment in experiments.values():
        assert set(experiment) == {"metric", "higher_is_better", "runs"}
        assert isinstance(experiment["metric"], str) and isinstance(experiment["higher_is_better"], bool)
        for run in experiment["runs"]:
            assert set(run) == {"condition", "seed", "value"} and run["seed"] == 0
            assert isinstance(run["value"], float) and 0 <= run["value"] <= 100
    assert sorted(r["condition"] for r in experiments["transfer_shapes_ap"]["runs"]) == [
        "plain18_pretrained", "plain18_scratch", "resnet18_pretrained", "resnet18_scratch"]
    assert sorted(r["condition"] for r in experiments["pretrain_top1"]["runs"]) == ["plain18", "resnet18"]
    assert {k: experiments[k] for k in pretraining["experiments"]} == pretraining["experiments"]
    assert experiments["pretrain_train_error"]["higher_is_better"] is False
    ap = {r["condition"]: r["value"] for r in experiments["transfer_shapes_ap"]["runs"]}
    assert ap["resnet18_scratch"] == pytest.approx(100 * cells[("resnet18", 0, False)]["AP"])
    assert {(c["a"], c["b"]) for c in saved["comparisons"] if c["experiment"] == "pretrain_top1"} == {
        ("resnet18", "plain18")}
    for name in ("transfer.png", "degradation.png"):
        assert (out / name).stat().st_size > 1000

    # the same command again: every stage is found done, nothing is retrained, the results are rebuilt the same
    metrics_times = {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/*/metrics.json")}
    start = time.time()
    again = transfer.main(["--config", str(config)])
    assert again["stages_run"] == []
    assert time.time() - start < 15
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/*/metrics.json")} == metrics_times
    assert again["cells"] == saved["cells"]
    assert (out / "stages.log").read_text().count("done before, skipped") == 2 + 6  # the cls stages, then all


def test_tiny_imagenet_class_subset_links_the_first_classes(tmp_path):
    root = tmp_path / "tiny"
    wnids = ["n03", "n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    annotations = []
    for k, wnid in enumerate(wnids):
        (root / "train" / wnid / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        Image.new("RGB", (8, 8)).save(root / "val" / "images" / f"val_{k}.JPEG")
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t7\t7")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")

    subset = tiny_imagenet_subset(root, 2, tmp_path / "data", "tiny-imagenet")
    assert tiny_imagenet_subset(root, 2, tmp_path / "data", "tiny-imagenet") == subset  # idempotent
    train = build_cls_dataset("tiny-imagenet", subset, "train", None)
    val = build_cls_dataset("tiny-imagenet", subset, "val", None)
    assert train.classes == val.classes == ["n01", "n02"]
    assert len(train) == 2 and sorted(val.targets) == [0, 1]


def _results(ap_by_condition: dict[tuple[str, bool], list[float]]) -> dict:
    cells = [{"backbone": b, "seed": seed, "pretrained": p, "AP": ap, "AP50": min(1.0, 2 * ap), "det_wall_s": 1.0}
             for (b, p), aps in ap_by_condition.items() for seed, ap in enumerate(aps)]
    classification = [{"backbone": b, "seed": seed, "top1": 50.0 + seed + (5 if b.startswith("resnet") else 0),
                       "train_top1": 60.0, "wall_s": 1.0} for b in ("resnet18", "plain18") for seed in range(3)]
    return {"metric": "AP", "backbones": ["resnet18", "plain18"], "seeds": [0, 1, 2], "cells": cells,
            "classification": classification}


def test_statistics_and_orderings_over_seeds():
    results = _results({("resnet18", True): [0.30, 0.32, 0.31], ("resnet18", False): [0.20, 0.21, 0.19],
                        ("plain18", True): [0.25, 0.10, 0.28], ("plain18", False): [0.20, 0.22, 0.21]})
    experiments = reproduction_experiments(results, "raccoon")
    rows = {(r["experiment"], r["condition"]): r for r in condition_statistics(experiments)}
    r18 = rows[("transfer_raccoon_ap", "resnet18_pretrained")]
    assert (r18["n"], r18["mean"], r18["std"]) == (3, pytest.approx(31.0), pytest.approx(1.0))
    assert r18["ci_low"] == pytest.approx(31 - 4.302653 / 3**0.5, abs=1e-5)  # t_{0.975, 2} = 4.302653
    held = {(c["experiment"], c["a"], c["b"]): c for c in comparisons(experiments, results["backbones"])}
    assert held[("transfer_raccoon_ap", "resnet18_pretrained", "resnet18_scratch")]["held"]
    assert held[("transfer_raccoon_ap", "resnet18_pretrained", "resnet18_scratch")]["diff"] == pytest.approx(11.0)
    assert not held[("transfer_raccoon_ap", "plain18_pretrained", "plain18_scratch")]["held"]  # too noisy
    assert held[("pretrain_top1", "resnet18", "plain18")]["diff"] == pytest.approx(5.0)
    assert ("transfer_raccoon_ap50", "resnet18_scratch", "plain18_scratch") in held
    markdown = results_markdown({**results, "experiments": experiments,
                                          "summaries": condition_statistics(experiments),
                                          "comparisons": list(held.values())})
    assert "| transfer_raccoon_ap | resnet18_pretrained − resnet18_scratch | +11.00 | [" in markdown
    assert "| transfer_raccoon_ap | resnet18_pretrained | 3 | 31.00 | 1.00 | [28.52, 33.48] |" in markdown


def test_depth_orderings_follow_the_paper_resnets_gain_plain_nets_do_not():
    aps = {("resnet18", True): [0.30, 0.31, 0.32], ("resnet34", True): [0.36, 0.37, 0.38],
           ("plain18", True): [0.28, 0.29, 0.30], ("plain34", True): [0.25, 0.26, 0.27],
           ("resnet18", False): [0.20, 0.21, 0.22]}
    results = _results(aps) | {"backbones": ["resnet18", "resnet34", "plain18", "plain34"]}
    rows = {(c["experiment"], c["a"], c["b"]): c
            for c in comparisons(reproduction_experiments(results, "bccd"), results["backbones"])}
    deeper_resnet = rows[("transfer_bccd_ap", "resnet34_pretrained", "resnet18_pretrained")]
    assert deeper_resnet["paper"] == "A > B" and deeper_resnet["held"] and deeper_resnet["agrees"]
    deeper_plain = rows[("transfer_bccd_ap", "plain34_pretrained", "plain18_pretrained")]
    assert deeper_plain["paper"] == "A <= B" and not deeper_plain["held"] and deeper_plain["agrees"]
    assert rows[("transfer_bccd_ap", "resnet34_pretrained", "plain34_pretrained")]["held"]
    assert ("transfer_bccd_ap", "resnet34_scratch", "resnet18_scratch") not in rows  # no resnet34 scratch runs
    contradicted = compare_pairs(reproduction_experiments(
        _results({("plain18", True): [0.20, 0.21, 0.22], ("plain34", True): [0.30, 0.31, 0.32]}), "bccd"),
        [("transfer_bccd_ap", "plain34_pretrained", "plain18_pretrained", "A <= B")])[0]
    assert contradicted["held"] and not contradicted["agrees"]  # a deeper plain net clearly better: not the paper's


def test_a_variant_names_its_own_experiments():
    results = _results({("resnet18", True): [0.30, 0.32, 0.31], ("resnet18", False): [0.20, 0.21, 0.19],
                        ("plain18", True): [0.25, 0.10, 0.28], ("plain18", False): [0.20, 0.22, 0.21]})
    plain, variant = (reproduction_experiments(results, "raccoon", v) for v in (None, "pretrain15ep"))
    assert sorted(variant) == sorted(f"{name}_pretrain15ep" for name in plain)
    assert all(variant[f"{name}_pretrain15ep"] == plain[name] for name in plain)
    held = {(c["experiment"], c["a"], c["b"]) for c in comparisons(variant, results["backbones"])}
    assert ("transfer_raccoon_ap_pretrain15ep", "resnet18_pretrained", "resnet18_scratch") in held
    assert ("pretrain_top1_pretrain15ep", "resnet18", "plain18") in held


def test_a_stage_runs_as_a_child_process_and_gets_the_stop_signal(tmp_path, monkeypatch):
    """A scheduler's SIGTERM to the experiment reaches the running stage (which writes its checkpoint and exits
    EXIT_PREEMPTED); the experiment then stops with the same status and marks nothing done."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "fake_train.py").write_text(
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
        "pathlib.Path(sys.argv[-1].split('=', 1)[1], 'started').touch()\n"
        "time.sleep(60)\n")
    monkeypatch.setattr(stages, "TOOLS_DIR", tools)
    stage_dir = tmp_path / "out" / "stage"
    stage_dir.mkdir(parents=True)

    def terminate_when_started() -> None:
        deadline = time.time() + 30
        while not (stage_dir / "started").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # to this process, as a scheduler would: run_tool passes it on

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_when_started, daemon=True).start()
    start = time.time()
    with pytest.raises(SystemExit) as stopped:
        stages.run_stage("fake_train", [], stage_dir, tmp_path / "out", start, [])
    assert stopped.value.code == stages.EXIT_PREEMPTED and time.time() - start < 30
    wall = json.loads((stage_dir / stages.WALL_TIME).read_text())  # this attempt counts towards the stage's time
    assert wall["finished"] is False and 0 < wall["seconds"] < 30
    assert "stopped with exit status 75" in (tmp_path / "out" / stages.STAGE_LOG).read_text()
    assert signal.getsignal(signal.SIGTERM) == handler  # ours again once the stage is over


def test_a_stage_that_fails_before_making_its_folder_stops_with_its_own_error(tmp_path, monkeypatch, capfd):
    """A tool that fails before it writes anything (a dataset folder not found) ends the experiment with that
    tool's status and message; no stage folder appears (it was a FileNotFoundError on wall_time.json before)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "fake_train.py").write_text(
        "import sys\nsys.exit('dataset folder not found: ../shared/data/tiny-imagenet-200/train')\n")
    monkeypatch.setattr(stages, "TOOLS_DIR", tools)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as stopped:
        stages.run_stage("fake_train", [], out / "stage", out, time.time(), [])
    assert stopped.value.code == 1
    assert "dataset folder not found" in capfd.readouterr().err
    assert not (out / "stage").exists()
    assert "stopped with exit status 1" in (out / stages.STAGE_LOG).read_text()


def test_a_stage_another_process_is_running_is_left_to_it(tmp_path, monkeypatch):
    """Two experiment commands sharing an output_dir: the second reaching a stage the first is training gets the
    tool's EXIT_IN_USE and stops, without adding its refused attempt to the stage's wall_time.json (which the
    first process writes when it ends: two writers would lose one's seconds)."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "fake_train.py").write_text(f"import sys\nsys.exit({EXIT_IN_USE})\n")
    monkeypatch.setattr(stages, "TOOLS_DIR", tools)
    out = tmp_path / "out"
    (out / "stage").mkdir(parents=True)
    (out / "stage" / stages.WALL_TIME).write_text(json.dumps({"seconds": 12.5, "finished": False}) + "\n")
    with pytest.raises(SystemExit) as stopped:
        stages.run_stage("fake_train", [], out / "stage", out, time.time(), [])
    assert stopped.value.code == EXIT_IN_USE
    assert json.loads((out / "stage" / stages.WALL_TIME).read_text()) == {"seconds": 12.5, "finished": False}
    assert "in use by another process" in (out / stages.STAGE_LOG).read_text()


FAKE_STAGE_TOOL = """\
import json, os, pathlib, sys
out = pathlib.Path([a.split("=", 1)[1] for a in sys.argv if a.startswith("output_dir=")][-1])
held = pathlib.Path(os.environ["HELD_STAGES"])  # "<stage dir>" held throughout, "<stage dir> once": held, then done
lines = held.read_text().splitlines()
for line in lines:
    if line.split()[0] == str(out):
        if line.endswith(" once"):  # the other process finishes it right after refusing us
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps({METRICS}))
            held.write_text("\\n".join(x for x in lines if x != line))
        sys.exit(73)
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({METRICS}))
"""


def test_two_processes_of_one_study_share_its_stages(tmp_path, monkeypatch, capsys):
    """The same command on two cores: a stage the other process holds (its run folder's lock: the tool exits
    EXIT_IN_USE) is passed over with the detection stages that need it, the rest runs; when only held stages are
    left the call stops with EXIT_IN_USE and writes no results. A stage the other process finished in the meantime
    is found done on the next pass, and the results are written."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "train_cls.py").write_text(FAKE_STAGE_TOOL.replace("{METRICS}", '{"top1": 50.0, "train_top1": 60.0}'))
    (tools / "train_det.py").write_text(FAKE_STAGE_TOOL.replace("{METRICS}", '{"AP": 0.3, "AP50": 0.6}'))
    monkeypatch.setattr(stages, "TOOLS_DIR", tools)
    held = tmp_path / "held.txt"
    monkeypatch.setenv("HELD_STAGES", str(held))
    config = _default_config(tmp_path)

    out = tmp_path / "held_throughout"
    held.write_text(f"{out / 'resnet18' / 'seed0' / 'cls'}\n")
    with pytest.raises(SystemExit) as stopped:
        transfer.main(["--config", str(config), f"output_dir={out}"])
    assert stopped.value.code == EXIT_IN_USE
    assert "1 stage(s) in use by another process of this study (resnet18/seed0/cls)" in capsys.readouterr().out
    assert sorted(str(p.parent.relative_to(out)) for p in out.glob("*/seed0/*/metrics.json")) == [
        "plain18/seed0/cls", "plain18/seed0/det_pretrained", "plain18/seed0/det_scratch"]
    assert not (out / "resnet18").exists() and not (out / "results.json").exists()  # its detection waits for it

    out = tmp_path / "finished_meanwhile"
    held.write_text(f"{out / 'resnet18' / 'seed0' / 'det_pretrained'} once\n")
    results = transfer.main(["--config", str(config), f"output_dir={out}"])
    assert results["stages_run"] == ["resnet18/seed0/cls", "resnet18/seed0/det_scratch", "plain18/seed0/cls",
                                     "plain18/seed0/det_pretrained", "plain18/seed0/det_scratch"]
    assert sorted((c["backbone"], c["pretrained"]) for c in results["cells"]) == [
        ("plain18", False), ("plain18", True), ("resnet18", False), ("resnet18", True)]
    assert (out / "results.json").is_file()
    log = (out / "stages.log").read_text()
    assert "resnet18/seed0/det_pretrained: in use by another process" in log
    assert "resnet18/seed0/det_pretrained: done before, skipped" in log
