"""Segmentation metrics against a plain numpy reference, and multi-scale / flip inference."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from segmentation.evaluation import SegmentationEvaluator, multiscale_flip_inference
from segmentation.palette import VOID

NUM_CLASSES = 6  # labels drawn from 0..4 only: class 5 is absent from GT and prediction


def random_batches(seed: int, count: int = 3):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        target = rng.integers(0, 5, (2, 9, 11))
        target[rng.random(target.shape) < 0.2] = VOID
        pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 5, target.shape))
        pred[pred == VOID] = 0  # the model never predicts void
        yield pred, target


def reference_metrics(batches) -> dict:
    """Per-class TP / FP / FN, the textbook way."""
    pred = np.concatenate([p.ravel() for p, _ in batches])
    target = np.concatenate([t.ravel() for _, t in batches])
    valid = target != VOID
    pred, target = pred[valid], target[valid]
    ious, accs = [], []
    for c in range(NUM_CLASSES):
        tp = np.sum((pred == c) & (target == c))
        fp = np.sum((pred == c) & (target != c))
        fn = np.sum((pred != c) & (target == c))
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        accs.append(tp / (tp + fn) if tp + fn else math.nan)
    return {"mIoU": np.nanmean(ious), "pixel_acc": np.mean(pred == target), "mean_acc": np.nanmean(accs), "ious": ious}


def test_evaluator_matches_numpy_reference():
    batches = list(random_batches(0))
    evaluator = SegmentationEvaluator(NUM_CLASSES, class_names=[f"c{i}" for i in range(NUM_CLASSES)])
    for i, (pred, target) in enumerate(batches):
        if i == 0:  # numpy [H, W], one image at a time
            for single_pred, single_target in zip(pred, target):
                evaluator.update(single_pred, single_target)
        else:  # torch [N, H, W]
            evaluator.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert evaluator.confusion.dtype == torch.int64
    result, expected = evaluator.compute(), reference_metrics(batches)
    for key in ("mIoU", "pixel_acc", "mean_acc"):
        assert result[key] == pytest.approx(expected[key])
    assert list(result["IoU_per_class"]) == [f"c{i}" for i in range(NUM_CLASSES)]
    assert math.isnan(result["IoU_per_class"]["c5"])
    np.testing.assert_allclose(list(result["IoU_per_class"].values()), expected["ious"])


def test_evaluator_rejects_out_of_range_predictions():
    with pytest.raises(ValueError, match="prediction"):
        SegmentationEvaluator(3).update(np.array([[3]]), np.array([[0]]))


class PixelwiseLinear(nn.Module):
    """A 1x1 conv: resolution-preserving and flip-equivariant; optionally torchvision-style dict output."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)
        self.as_dict = as_dict

    def forward(self, x):
        out = self.conv(x)
        return {"out": out} if self.as_dict else out


def test_multiscale_flip_shape_and_dict_output():
    image = torch.rand(1, 3, 13, 17)
    logits = multiscale_flip_inference(PixelwiseLinear(as_dict=True), image, scales=(0.5, 0.75, 1.5), flip=True)
    assert logits.shape == (1, 4, 13, 17)
    torch.testing.assert_close(logits.softmax(1).sum(1), torch.ones(1, 13, 17))


def test_flip_of_equivariant_model_equals_single_scale():
    model, image = PixelwiseLinear(), torch.rand(1, 3, 13, 17)
    single = multiscale_flip_inference(model, image)
    torch.testing.assert_close(single, model(image).log_softmax(1))
    torch.testing.assert_close(multiscale_flip_inference(model, image, flip=True), single)
