"""Semantic-segmentation metrics (confusion-matrix mIoU) and multi-scale / flip inference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segmentation.palette import VOID


class SegmentationEvaluator:
    """Accumulates a [num_classes, num_classes] int64 confusion matrix (rows = GT, cols = pred).

    Only the matrix is state for the metrics, so distributed ranks can sum `confusion` (all-reduce or `merge`)
    and any rank computes the exact global metrics. `image_miou` keeps each image's own mIoU (classes present
    in its ground truth or prediction) for the report's gallery of the worst images.
    """

    def __init__(self, num_classes: int, ignore_index: int = VOID, class_names: Sequence[str] | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names or (str(i) for i in range(num_classes)))
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.image_miou: dict[int, float] = {}  # image index -> its own mIoU, for the images given one

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
               image_indices: Sequence[int] | None = None) -> None:
        """Add predicted class indices vs ground truth, both [N, H, W] or [H, W]; with `image_indices` (one per
        image of the batch) also record each image's mIoU."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if image_indices is not None:
            for index, one_pred, one_target in zip(image_indices, pred.reshape(-1, *pred.shape[-2:]),
                                                   target.reshape(-1, *target.shape[-2:])):
                confusion = self._confusion(one_pred, one_target)
                self.confusion += confusion
                self.image_miou[int(index)] = _nanmean(_iou(confusion.double().numpy()))
            return
        self.confusion += self._confusion(pred, target)

    def _confusion(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = target != self.ignore_index
        pred, target = pred[keep].long(), target[keep].long()
        n = self.num_classes
        for name, values in (("prediction", pred), ("target", target)):
            if values.numel() and (values.min() < 0 or values.max() >= n):
                raise ValueError(f"{name} has class indices outside [0, {n}) (ignore_index={self.ignore_index})")
        return torch.bincount(target * n + pred, minlength=n * n).reshape(n, n).cpu()

    def compute(self) -> dict:
        """mIoU, pixel accuracy, mean class accuracy, per-class IoU and accuracy (recall of the class's pixels).

        A class absent from both GT and prediction has IoU nan and is left out of the means; one absent from the
        GT has accuracy nan.
        """
        confusion = self.confusion.double().numpy()
        true_pos = np.diag(confusion)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = _iou(confusion)
            class_acc = true_pos / confusion.sum(1)
            pixel_acc = true_pos.sum() / confusion.sum()
        return {
            "mIoU": _nanmean(iou),
            "pixel_acc": float(pixel_acc),
            "mean_acc": _nanmean(class_acc),
            "IoU_per_class": dict(zip(self.class_names, iou.tolist())),
            "acc_per_class": dict(zip(self.class_names, class_acc.tolist())),
        }


def _iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU of a [GT, prediction] confusion matrix; nan for a class in neither."""
    true_pos = np.diag(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        return true_pos / (confusion.sum(1) + confusion.sum(0) - true_pos)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-nan entries; nan (without numpy's warning) when there are none."""
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


@torch.no_grad()
def multiscale_flip_inference(
    model: torch.nn.Module,
    image: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Average softmax probabilities over rescaled (bilinear) and h-flipped copies of `image`.

    `model(x)` must return logits at x's resolution (a tensor, or a dict with key "out").
    Returns the log of the averaged probabilities [N, C, H, W]: valid logits whose softmax is
    the average, so callers can treat them like a single forward pass.
    """
    if not scales:
        raise ValueError("multiscale_flip_inference needs at least one scale")
    height, width = image.shape[-2:]
    prob_sum, views = 0.0, 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            out = model(scaled.flip(-1) if flipped else scaled)
            logits = out["out"] if isinstance(out, dict) else out
            logits = logits.flip(-1) if flipped else logits
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            prob_sum = prob_sum + logits.float().softmax(1)
            views += 1
    return (prob_sum / views).clamp_min(torch.finfo(torch.float32).tiny).log()
