"""tools/benchmark_det.py (and experiments.detection_benchmark, its library) at tiny settings: the JSON it writes,
its equivalence checks, its subprocess path."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from backbones import fold_batchnorm
from detection.fast import to_channels_last
from detection.models import build_detector
from experiments import detection_benchmark as lib
from experiments.benchmarking import losses_close, matched_fraction

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_det", ROOT / "tools" / "benchmark_det.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["benchmark_det"] = bench
_spec.loader.exec_module(bench)

# 1 thread: the suite may share the machine, and oversubscribed OpenMP threads are many times slower
TINY = dict(size=64, batch=2, warmup=1, iters=1, threads=1, device="cpu", backbone="resnet18")


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    threads = torch.get_num_threads()  # the benchmark sets its own; leave the rest of the suite as it was
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "benchmarks.json"
    argv = ["--backbone", "resnet18", "--size", "64", "--warmup", "1", "--iters", "1", "--threads", "1",
            "--no-isolate", "--out", str(out)]
    bench.main(argv)
    return json.loads(out.read_text())


def test_json_has_every_field_and_positive_numbers(tiny_run):
    r = tiny_run
    for key in ("size", "batch", "warmup", "iters", "threads", "device", "backbone", "score_thresh"):
        assert key in r["settings"]
    assert r["settings"]["size"] == 64 and r["settings"]["threads"] == 1
    for key in ("torch", "torchvision", "cpu_model", "threads", "cpu_count"):
        assert r["environment"][key]
    assert r["command"].startswith("python tools/benchmark_det.py")
    train = r["training"]["ours"]
    assert train["images_per_s"] > 0 and train["step_s_median"] > 0 and len(train["step_s"]) == 1
    assert train["torch_threads"] == 1 and train["trainable_params"] > 0
    assert set(train["first_step_losses"]) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(r["training"]) == {"ours", "ours_channels_last", "ours_bf16"}
    assert train["gflop_per_step"] > 0 and 0 < train["ceiling_fraction"] < 1.5
    assert r["ceiling"]["gflop_per_s"] > 1 and r["ceiling"]["threads"] == 1
    # torchvision only for resnet50
    assert set(r["inference"]) == {"ours", "ours_fold", "ours_fold_channels_last", "ours_fast_compiled", "ours_int8",
                                   "ours_bf16"}
    gflop = {res["gflop"] for res in r["inference"].values()}
    assert len(gflop) == 1 and gflop.pop() > 0  # the same arithmetic, counted on the same input
    for variant, res in r["inference"].items():
        assert res["ms_per_image_median"] > 0 and len(res["ms"]) == 1
        assert res["speedup_vs_ours"] > 0 and res["speedup_vs_torchvision"] is None
        assert set(res["stages_ms"]) == set(lib.STAGES) and all(t >= 0 for t in res["stages_ms"].values())
        assert res["staged_equals_model"] and res["first_call_s"] > 0
        assert {"method", "baseline_mb", "peak_mb", "delta_mb"} <= set(res["memory"])
        assert res["memory"]["delta_mb"] >= 0
    assert r["inference"]["ours"]["batchnorms_left"] > 0
    assert r["inference"]["ours_fold"]["batchnorms_left"] == 0
    # int8 is not exact: timed, but outside the equivalence checks (its AP cost is measured on trained models)
    for inexact in ("ours_int8", "ours_bf16"):
        assert inexact not in r["checks"]["float64_detections"] and inexact not in r["checks"]["fold_float32_timed_runs"]


def test_folded_and_channels_last_give_the_same_detections(tiny_run):
    checks = tiny_run["checks"]
    fold = checks["float64_detections"]  # exact up to float64 rounding, score threshold 0 -> 100 detections
    assert fold["passed"]
    for variant in ("ours_fold", "ours_fold_channels_last", "ours_fast_compiled"):
        assert fold[variant]["num_detections"] == [100, 100] and fold[variant]["labels_equal"]
        assert fold[variant]["max_abs_box_diff"] < 1e-6 and fold[variant]["max_abs_score_diff"] < 1e-8
        # the float32 timed runs: near-ties of random weights may swap a few, but most must agree
        assert checks["fold_float32_timed_runs"][variant]["matched_fraction"] >= 0.9
    assert checks["fold_removes_every_batchnorm"]["passed"] and checks["staged_forward_equals_model"]["passed"]
    assert checks["channels_last_first_step_losses"]["passed"]


def test_float32_fold_and_channels_last_within_tolerance():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_detector(lib.ours_cfg("resnet18", 0.0)).eval()
    # trained-like BN statistics, so folding actually changes the conv weights
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
    image = lib.make_images(1, 64, 7)[0]
    with torch.no_grad():
        ref_features = model.backbone(model.transform([image])[0].tensors)
        ref = model([image])[0]
        fold_batchnorm(model)
        to_channels_last(model)
        assert lib.count_batchnorms(model) == 0
        features = model.backbone(model.transform([image])[0].tensors)
        got = model([image])[0]
    for name in ref_features:
        torch.testing.assert_close(features[name], ref_features[name], rtol=1e-4, atol=1e-4)
    assert features["p2"].is_contiguous(memory_format=torch.channels_last)
    assert matched_fraction(ref, got) >= 0.9


def test_torchvision_reference_uses_the_frozen_bn_recipe():
    tv = lib.build_torchvision(64, 0.05)
    ours = build_detector(lib.ours_cfg("resnet50", 0.05))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tv.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in tv.modules()) == 53
    trainable = lambda model: sum(p.numel() for p in model.parameters() if p.requires_grad)  # noqa: E731
    assert trainable(tv) == trainable(ours)
    assert not tv.backbone.body.conv1.weight.requires_grad and not tv.backbone.body.layer1[0].conv1.weight.requires_grad
    assert tv.backbone.body.layer2[0].conv1.weight.requires_grad
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert tv.transform.min_size == (64,) and tv.transform.max_size == 64


def test_subprocess_phase_measures_peak_rss(tmp_path):
    settings = {**lib.DEFAULTS, **TINY, "warmup": 0}
    weights = tmp_path / "weights.pt"
    lib.make_weights(settings, weights)
    result = bench.run_phase_isolated(dict(phase="infer", model="ours_fold_channels_last", settings=settings,
                                           weights=str(weights), detections_out=str(tmp_path / "det.pt")))
    assert result["ms_per_image_median"] > 0 and result["torch_threads"] == 1
    assert result["memory"]["peak_mb"] >= result["memory"]["baseline_mb"] > 0
    assert set(torch.load(tmp_path / "det.pt", weights_only=True)) == {"boxes", "scores", "labels"}


def test_markdown_table(tiny_run):
    text = bench.to_markdown(tiny_run)
    assert "| Training, batch 2 | images/s |" in text
    assert "| ours + fold BN + channels_last |" in text and "| ours + fold BN + channels_last + compile |" in text
    assert "| Inference stages, ms (median) | transform | backbone_fpn | rpn | roi_heads | postprocess | sum |" in text
    assert "Checks passed:" in text and "float64_detections" in text


def test_resnet50_phases_do_the_same_work_as_torchvision(tmp_path):
    """The benchmark's own asserts, on its own builders: equal first-step losses, identical detections."""
    settings = {**lib.DEFAULTS, **TINY, "backbone": "resnet50", "warmup": 0, "score_thresh": 0.0}
    weights = tmp_path / "weights.pt"
    lib.make_weights(settings, weights)
    train = {name: lib.run_phase(dict(phase="train", model=name, settings=settings, weights=str(weights)))
             for name in ("torchvision", "ours")}
    # ours applies frozen BN inside the convs (rounding differs) and its RoIAlign backward is a sparse product
    ours, tv = train["ours"]["first_step_losses"], train["torchvision"]["first_step_losses"]
    assert losses_close(ours, tv, rtol=1e-4, atol=1e-5)
    assert train["ours"]["trainable_params"] == train["torchvision"]["trainable_params"]
    check = lib.check_float64_detections(settings, weights)["torchvision"]  # float64: the same detections
    assert check["passed"] and check["num_detections"] == [100, 100] and check["max_abs_box_diff"] < 1e-6
