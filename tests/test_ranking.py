"""detection.ranking: equal scores rank in index order in eager PyTorch, TorchScript and onnxruntime alike (a
raccoon photograph's ONNX detections moved by 24 px when the RPN's top-n left ties to torch.topk)."""
from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn
from torchvision.ops import nms

from detection.ranking import TieOrderedRPN, batched_nms

LEVELS = [140, 70]


def tied_objectness() -> torch.Tensor:
    """Two FPN levels' logits where most values repeat, as anchors over zero padding do."""
    return torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.5] * 30)[None]


def grid_with_tied_scores(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n disjoint 10 px boxes (NMS keeps all), 7 distinct scores, 3 groups."""
    corners = torch.stack(torch.meshgrid(torch.arange(60.0), torch.arange(25.0), indexing="ij"), -1).reshape(-1, 2)
    boxes = torch.cat([corners, corners + 10 / 15], 1)[:n] * 15
    return boxes, (torch.arange(n) % 7).float() / 10, torch.arange(n) % 3


class TopN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rpn = TieOrderedRPN(None, None, 0.7, 0.3, 256, 0.5, dict(training=30, testing=30),
                                 dict(training=10, testing=10), 0.7).eval()

    def forward(self, objectness: torch.Tensor) -> torch.Tensor:
        return self.rpn._get_top_n_idx(objectness, LEVELS)


class BatchedNMS(nn.Module):
    def forward(self, boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor) -> torch.Tensor:
        return batched_nms(boxes, scores, idxs, 0.7, num_groups=3)


def index_order(values: np.ndarray) -> np.ndarray:
    return np.argsort(-values, kind="stable")


def onnx_session(module: nn.Module, example: tuple, names: list[str], path) -> onnxruntime.InferenceSession:
    with pytest.warns():  # the tracer's notes on Python values, expected
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={name: {0: "n"} for name in names if name != "objectness"})
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_rpn_top_n_takes_equal_objectness_in_anchor_order_everywhere(tmp_path):
    objectness = tied_objectness()
    first, second = (level.numpy() for level in objectness[0].split(LEVELS))
    want = np.concatenate([index_order(first)[:30], index_order(second)[:30] + LEVELS[0]])
    eager = TopN()(objectness)
    traced = torch.jit.trace(TopN(), (objectness,))
    session = onnx_session(TopN(), (objectness,), ["objectness"], tmp_path / "top_n.onnx")
    np.testing.assert_array_equal(eager[0].numpy(), want)
    np.testing.assert_array_equal(traced(objectness)[0].numpy(), want)
    np.testing.assert_array_equal(session.run(None, {"objectness": objectness.numpy()})[0][0], want)


@pytest.mark.parametrize("n", [900, 1200])  # the coordinate trick (<= 4,000 coordinates) and one NMS per group
def test_batched_nms_returns_equal_scores_in_index_order_everywhere(tmp_path, n):
    """All boxes survive, so the answer is the order: high to low, ties by index (torchvision's own batched_nms
    orders the per-group path's ties as its unstable sort happens to)."""
    case = grid_with_tied_scores(n)
    want = index_order(case[1].numpy())
    traced = torch.jit.trace(BatchedNMS(), grid_with_tied_scores(900))
    session = onnx_session(BatchedNMS(), grid_with_tied_scores(900), ["boxes", "scores", "idxs"], tmp_path / "nms.onnx")
    np.testing.assert_array_equal(BatchedNMS()(*case).numpy(), want)
    np.testing.assert_array_equal(traced(*case).numpy(), want)
    np.testing.assert_array_equal(session.run(None, dict(zip(["boxes", "scores", "idxs"], (t.numpy() for t in case))))[0], want)


def test_nms_keeps_the_earlier_of_equal_scores_in_onnxruntime_as_in_torchvision(tmp_path):
    """Overlapping boxes with four score values: which of two equal boxes NMS keeps is the same in both."""
    class NMS(nn.Module):
        def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return nms(boxes, scores, 0.5)

    generator = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(50):
        n = int(torch.randint(5, 400, (1,), generator=generator))
        corner, size = torch.rand(n, 2, generator=generator) * 60, torch.rand(n, 2, generator=generator) * 30 + 2
        cases.append((torch.cat([corner, corner + size], 1), torch.randint(0, 4, (n,), generator=generator) / 4))
    session = onnx_session(NMS(), cases[0], ["boxes", "scores"], tmp_path / "nms.onnx")
    for boxes, scores in cases:
        got = session.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})[0]
        np.testing.assert_array_equal(got, nms(boxes, scores, 0.5).numpy())
