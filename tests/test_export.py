"""tools/export.py: the whole detector through ONNX (onnxruntime) and TorchScript, the backbone via torch.export."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import export  # noqa: E402

from detection import Predictor  # noqa: E402
from engine.images import read_image  # noqa: E402



def run_export(run: Path, fmt: str, out: Path, *extra: str) -> dict:
    return export.main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "last.pth"), "--format", fmt,
                        "--out", str(out), *extra])


def test_onnx_export_matches_pytorch_and_predictor(tiny_det_run, tmp_path):
    report = run_export(tiny_det_run, "onnx", tmp_path / "model.onnx")
    assert report["passed"] and len(report["checks"]) == 8  # 4 val images, each at 2 sizes
    assert report["max_box_diff_px"] <= 1.0 and all(c["labels_equal"] for c in report["checks"])
    assert sum(c["detections"] for c in report["checks"]) > 0
    # outside the tool: onnxruntime on an image file, against the Predictor (whose resize is OpenCV's on uint8,
    # so the confident detections agree to about a pixel, not exactly)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels"]
    path = sorted((tiny_det_run.parent / "shapes" / "train").glob("*.png"))[0]
    image = read_image(path).transpose(2, 0, 1).astype(np.float32) / 255
    boxes, scores, labels = session.run(None, {"image": image})
    expected = Predictor(tiny_det_run / "config.yaml", tiny_det_run / "last.pth", score_thresh=0.5)(path)
    confident = scores >= 0.5
    assert labels[confident].tolist() == expected.labels.tolist()
    np.testing.assert_allclose(boxes[confident], expected.boxes, atol=1.5)


def test_torchscript_export_matches_pytorch(tiny_det_run, tmp_path):
    report = run_export(tiny_det_run, "torchscript", tmp_path / "model.ts")
    assert report["passed"] and report["max_box_diff_px"] <= 1.0
    module = torch.jit.load(str(tmp_path / "model.ts"))
    boxes, scores, labels = module(torch.rand(3, 50, 70))
    assert boxes.shape[1] == 4 and len(boxes) == len(scores) == len(labels)


def test_backbone_export_via_torch_export(tiny_det_run, tmp_path):
    report = run_export(tiny_det_run, "torch_export", tmp_path / "backbone.pt2", "--backbone-only")
    assert report["passed"]
    features = torch.export.load(str(tmp_path / "backbone.pt2")).module()(torch.rand(3, 3, 96, 64))
    assert set(features) == {"res2", "res3", "res4", "res5"} and features["res5"].shape == (3, 512, 3, 2)
    with pytest.raises(SystemExit):  # whole-detector torch.export is refused with a reason
        run_export(tiny_det_run, "torch_export", tmp_path / "whole.pt2")


def test_a_broken_export_fails_loudly(tiny_det_run, tmp_path, monkeypatch):
    """A runtime whose boxes are off by 2 px must fail the check."""
    real = export.onnx_runner
    monkeypatch.setattr(export, "onnx_runner", lambda path: (lambda image: (lambda b, s, l: (b + 2, s, l))(
        *real(path)(image))))
    with pytest.raises(export.ExportCheckFailed, match="does not reproduce"):
        run_export(tiny_det_run, "onnx", tmp_path / "model.onnx")
