"""tools/export.py: the whole detector through ONNX (onnxruntime) and TorchScript, checked against the Predictor;
the backbone via torch.export."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.ops import batched_nms
from torchvision.ops import boxes as box_ops

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import export  # noqa: E402

from datafiles.images import image_to_tensor, read_image  # noqa: E402
from detection import Predictor  # noqa: E402
from detection.export import InGraphTestResize, compare_detections, resized_size  # noqa: E402
from detection.export_check import check_detector  # noqa: E402
from detection.ranking import batched_nms as tie_ordered_batched_nms  # noqa: E402
from detection.transforms import build_det_transforms  # noqa: E402

RACCOON = ROOT.parent / "shared" / "data" / "raccoon"
ODD_SIZES = [(417, 650), (650, 417), (1, 1000), (1000, 1), (1, 1), (7, 3), (61, 96), (333, 333)]


def run_export(run: Path, fmt: str, out: Path, *extra: str) -> dict:
    return export.main(["--config", str(run / "config.yaml"), "--checkpoint", str(run / "last.pth"), "--format", fmt,
                        "--out", str(out), *extra])


def transform_output(image: np.ndarray, shortest: int, longest: int) -> np.ndarray:
    transform = build_det_transforms(False, shortest, longest)
    return transform(image=image, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))["image"]


class SizeRule(torch.nn.Module):
    def __init__(self, shortest: int, longest: int) -> None:
        super().__init__()
        self.sides = shortest, longest

    def forward(self, size: torch.Tensor) -> torch.Tensor:
        return resized_size(size, *self.sides)


def onnx_session(module: torch.nn.Module, example: tuple, path: Path, **export_args) -> onnxruntime.InferenceSession:
    with pytest.warns():  # the tracer's notes on Python values, expected
        torch.onnx.export(module, example, str(path), dynamo=False, **export_args)
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shortest, longest", [(64, 96), (320, 427), (800, 1333)])
def test_resized_size_is_the_test_transforms_for_every_input_size(shortest, longest, tmp_path):
    """The exported graph's size rule, in PyTorch and onnxruntime, against the datasets' albumentations resize
    itself, on the odd sizes and 300 random ones: one rounding apart (torchvision's float32 scale and floor, or
    a division the exporter moves to float32) would show here."""
    session = onnx_session(SizeRule(shortest, longest), (torch.tensor([300, 400]),), tmp_path / "size.onnx",
                           input_names=["size"])
    sizes = ODD_SIZES + [tuple(s) for s in np.random.default_rng(shortest).integers(1, 2000, (300, 2)).tolist()]
    for height, width in sizes:
        expected = transform_output(np.zeros((height, width, 1), np.uint8), shortest, longest).shape[:2]
        assert tuple(resized_size(torch.tensor([height, width]), shortest, longest).tolist()) == expected
        assert tuple(session.run(None, {"size": np.array([height, width])})[0].tolist()) == expected, (height, width)


def test_exported_resize_is_the_predictors_bit_for_bit(tmp_path):
    """The in-graph resize alone, exported at one size and run by onnxruntime and TorchScript on others (odd
    sizes, 2x reductions, same size, upscaling), against the Predictor's OpenCV resize on uint8: the same bytes."""
    resize = InGraphTestResize(96, 128)
    session = onnx_session(resize, (torch.rand(3, 300, 400),), tmp_path / "resize.onnx", input_names=["image"],
                           dynamic_axes={"image": {1: "height", 2: "width"}})
    with pytest.warns():
        traced = torch.jit.trace(resize, (torch.rand(3, 300, 400),))
    rng = np.random.default_rng(0)
    sizes = ODD_SIZES + [(192, 256), (96, 128), (40, 50)] + [tuple(s) for s in rng.integers(1, 900, (40, 2)).tolist()]
    for height, width in sizes:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = image_to_tensor(transform_output(image, 96, 128)).numpy()
        tensor = image_to_tensor(image)
        for got in (session.run(None, {"image": tensor.numpy()})[0], traced(tensor).numpy(), resize(tensor).numpy()):
            assert got.shape == expected.shape and np.array_equal(got, expected), (height, width)


def test_compare_detections_rule():
    box = np.array([[10.0, 10.0, 50.0, 60.0]])
    one = (box, np.array([0.9]), np.array([1]))
    assert compare_detections(one, (box + 0.9, np.array([0.28]), np.array([1])))["passed"]  # score moved, box 0.9 px
    assert not compare_detections(one, (box + 1.5, np.array([0.9]), np.array([1])))["passed"]
    assert not compare_detections(one, (box, np.array([0.9]), np.array([2])))["passed"]  # another label
    assert not compare_detections(one, (box, np.array([0.2]), np.array([1])))["passed"]  # too weak to count
    weak = (box, np.array([0.27]), np.array([1]))
    assert compare_detections(weak, (np.zeros((0, 4)), np.zeros(0), np.zeros(0)))["passed"]  # neither side sure
    result = compare_detections((np.zeros((0, 4)), np.zeros(0), np.zeros(0)), one)
    assert result["unmatched"][1][0]["score"] == 0.9 and not result["passed"]  # what only the export finds counts too


def test_onnx_export_is_checked_against_the_predictor(tiny_det_run, tmp_path):
    report = run_export(tiny_det_run, "onnx", tmp_path / "model.onnx")
    assert report["passed"] and report["images"] == report["images_equal"] == 4 and report["views"] == 8
    assert report["confident_detections"]["predictor"] > 0 and report["max_box_diff_px"] <= 1.0
    # outside the tool: onnxruntime on an image file, against the Predictor (single-scale, as the run's config)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels"]
    path = sorted((tiny_det_run.parent / "shapes" / "train").glob("*.png"))[0]
    got = session.run(None, {"image": image_to_tensor(read_image(path)).numpy()})
    expected = Predictor(tiny_det_run / "config.yaml", tiny_det_run / "last.pth")(path)
    assert compare_detections((expected.boxes, expected.scores, expected.labels), got)["passed"]


def test_torchscript_export_is_checked_against_the_predictor(tiny_det_run, tmp_path):
    report = run_export(tiny_det_run, "torchscript", tmp_path / "model.ts")
    assert report["passed"] and report["images_equal"] == 4
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


def test_an_export_that_differs_fails_naming_the_images(tiny_det_run, tmp_path, monkeypatch):
    """A runtime whose boxes are off by 2 px must fail the check, naming each image."""
    real = export.onnx_runner
    monkeypatch.setattr(export, "onnx_runner", lambda path: (lambda image: (lambda b, s, l: (b + 2, s, l))(
        *real(path)(image))))
    named = r"does not reproduce the Predictor on 4 of 4 images: .*000001\.png.*000004\.png\n.*000001\.png.*nearest_px"
    with pytest.raises(export.ExportCheckFailed, match=named) as failed:
        run_export(tiny_det_run, "onnx", tmp_path / "model.onnx")
    assert "near-tie" not in str(failed.value)  # the file differs from its own module: an export error


def test_a_predictor_that_differs_from_an_exact_export_is_called_rounding(tmp_path):
    """Where the exported file equals its own module run eagerly but not the Predictor, the failure says why: the
    Predictor's convolution rounding at a near-tie, not the export (docs/export.md); where the file differs from
    its module too, it does not."""
    boxes, scores, labels = torch.tensor([[4.0, 4.0, 30.0, 30.0]]), torch.tensor([0.9]), torch.tensor([1])
    exported = lambda image: (boxes, scores, labels)  # noqa: E731
    class Shifted(SimpleNamespace):  # a Predictor whose answer is the same detection 20 px away
        def __call__(self, view: np.ndarray) -> SimpleNamespace:
            return SimpleNamespace(boxes=boxes.numpy() + 20, scores=scores.numpy(), labels=labels.numpy())

    shifted = Shifted(score_thresh=0.05, cfg=OmegaConf.create({"data": {"min_size": [64], "max_size": 64}}))
    images = [("one.png", np.zeros((64, 64, 3), np.uint8))]
    with pytest.raises(export.ExportCheckFailed, match="near-tie in proposal selection or NMS, not an export error"):
        check_detector(shifted, exported, images, tmp_path / "x", "onnx", exported_module=exported)
    with pytest.raises(export.ExportCheckFailed) as failed:  # the file differs from its own module: an export error
        check_detector(shifted, exported, images, tmp_path / "x", "onnx",
                       exported_module=lambda image: (boxes + 5, scores, labels))
    assert "near-tie" not in str(failed.value)


@pytest.fixture(scope="module")
def raccoon_run(tmp_path_factory) -> Path:
    """A small R18-FPN trained on 32 raccoon photographs at 64 px for 80 iterations (one torch thread)."""
    if not (RACCOON / "annotations" / "instances_val.json").is_file():
        pytest.skip(f"the raccoon set is not at {RACCOON} (see /work/shared/data/raccoon/SOURCE.md)")
    import train_det

    out = tmp_path_factory.mktemp("raccoon") / "run"
    train_det.main(["--config", str(ROOT / "configs" / "det" / "raccoon.yaml"), f"data.root={RACCOON}",
                    f"output_dir={out}", "data.num_workers=0", "data.train_limit=32", "data.val_limit=24",
                    "data.min_size=[64]", "data.max_size=96", "model.fpn_channels=32", "model.roi.head_dim=64",
                    "model.roi.batch_size_per_image=32", "model.rpn.pre_nms_top_n_train=300",
                    "model.rpn.pre_nms_top_n_test=200", "model.rpn.post_nms_top_n_test=100",
                    "train.iters=80", "train.warmup_iters=10", "train.lr=0.02", "train.log_every=20"])
    return out


@pytest.mark.parametrize("fmt, sizes", [("onnx", ("64", "96")), ("onnx", ("96", "128")), ("torchscript", ("80", "112"))])
def test_export_equals_the_predictor_on_real_images(raccoon_run, tmp_path, fmt, sizes):
    """The run's 24 val photographs (each also at 3/4 size) at two test sizes: the export's detections are the
    Predictor's by the tool's rule, on every image, and to float rounding (the same resized pixels)."""
    report = run_export(raccoon_run, fmt, tmp_path / "model", "--check-count", "0",
                        f"data.min_size=[{sizes[0]}]", f"data.max_size={sizes[1]}")
    assert report["images"] == report["images_equal"] == 24, report["differing"]
    assert report["confident_detections"]["predictor"] >= 10  # detections to compare, or the check proves little
    assert report["max_box_diff_px"] < 0.01


def test_export_equals_the_predictor_on_odd_sizes(raccoon_run, tmp_path):
    """A photograph squeezed to 650x417 and 417x650, cut to a 1 px row and column and a 2x3 patch: every size
    that can reach the exported model gives the Predictor's detections."""
    photo = read_image(sorted((RACCOON / "JPEGImages").glob("*.jpg"))[0])
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, image in {"wide": cv2.resize(photo, (650, 417)), "tall": cv2.resize(photo, (417, 650)),
                        "row": photo[:1], "column": photo[:, :1], "patch": photo[100:102, 100:103]}.items():
        cv2.imwrite(str(folder / f"{name}.png"), image[..., ::-1])
    report = run_export(raccoon_run, "onnx", tmp_path / "model.onnx", "--check-images", str(folder))
    assert report["images"] == report["images_equal"] == 5, report["differing"]
    assert {tuple(c["size"]) for c in report["checks"]} >= {(417, 650), (650, 417), (1, photo.shape[1]), (2, 3)}


def nms_cases() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Boxes 0 and 1 (group 4) overlap with an IoU on the 0.7 threshold: torchvision's per-group NMS drops box 1,
    its coordinate trick (float32 offsets of 4 x 601.3) keeps it. Alone they take the trick in eager PyTorch; with
    1,000 disjoint boxes of group 2 beside them (over 4,000 coordinates) the per-group path."""
    x = 118.13
    near_tie = torch.tensor([[x, 50, x + 10, 60], [x, 50, x + 10, 57], [0, 0, 600.3, 400]])
    corners = torch.stack(torch.meshgrid(torch.arange(40.0), torch.arange(25.0), indexing="ij"), -1).reshape(-1, 2) * 15
    fillers = torch.cat([corners, corners + 10], 1)
    small = (near_tie, torch.tensor([0.9, 0.8, 0.5]), torch.tensor([4, 4, 0]))
    large = (torch.cat([near_tie, fillers]), torch.cat([small[1], torch.linspace(0.1, 0.4, 1000)]),
             torch.cat([small[2], torch.full((1000,), 2)]))
    return [small, large]


class BatchedNMS(torch.nn.Module):
    def forward(self, boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
        return tie_ordered_batched_nms(boxes, scores, idxs, 0.7, num_groups=5)


def test_exported_nms_takes_the_path_eager_pytorch_takes_at_every_size(tmp_path):
    """A trace keeps torchvision's coordinate trick for every size (a BCCD image lost a detection to it in
    TorchScript); detection.ranking.batched_nms, traced on the small case, gives eager's answer for both sizes in
    TorchScript and in onnxruntime."""
    small, large = nms_cases()
    for boxes, scores, idxs in (small, large):  # the two paths really differ on these boxes
        assert 1 in box_ops._batched_nms_coordinate_trick(boxes, scores, idxs, 0.7)
        assert 1 not in box_ops._batched_nms_vanilla(boxes, scores, idxs, 0.7)
    expected = [batched_nms(*case, 0.7) for case in (small, large)]
    assert 1 in expected[0] and 1 not in expected[1] and len(expected[1]) == 1002
    plain = torch.jit.trace(lambda b, s, i: batched_nms(b, s, i, 0.7), small)
    assert 1 in plain(*large)  # the bug: a plain trace takes the trick at every size

    traced = torch.jit.trace(BatchedNMS(), small)
    torch.onnx.export(BatchedNMS(), small, str(tmp_path / "nms.onnx"), dynamo=False, opset_version=17,
                      input_names=["boxes", "scores", "idxs"], output_names=["keep"],
                      dynamic_axes={"boxes": {0: "n"}, "scores": {0: "n"}, "idxs": {0: "n"}, "keep": {0: "k"}})
    session = onnxruntime.InferenceSession(str(tmp_path / "nms.onnx"), providers=["CPUExecutionProvider"])
    for case, want in zip((small, large), expected):
        assert torch.equal(BatchedNMS()(*case), want)
        assert torch.equal(traced(*case), want)
        got = session.run(None, dict(zip(["boxes", "scores", "idxs"], (t.numpy() for t in case))))[0]
        assert torch.equal(torch.from_numpy(got), want)
