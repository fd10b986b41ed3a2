"""Top-k accuracy kept as integer counts, so distributed ranks can sum them before dividing."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def average_crops(logits: Tensor) -> Tensor:
    """[N, crops, C] logits -> [N, C] class probabilities averaged over crops; [N, C] unchanged.

    Averages softmax (not raw logits) as in the multi-crop evaluation of Krizhevsky et al. /
    He et al.; top-k only reads the ranking, so the 2-D case can stay as logits.
    """
    if logits.dim() == 3:
        return logits.softmax(dim=-1).mean(dim=1)
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [N, C] or [N, crops, C], got {tuple(logits.shape)}")
    return logits


@torch.no_grad()
def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the k highest scores, for each k in `ks`.

    A k larger than the number of classes counts every sample as correct (e.g. top-5 on 4 classes).
    """
    scores = average_crops(logits)
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {targets.shape[0]} targets")
    maxk = min(max(ks), scores.shape[1])
    top = scores.topk(maxk, dim=1).indices  # [N, maxk], best first
    hits = top == targets.view(-1, 1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


class AccuracyMeter:
    """Accumulates top-k correct counts and the sample total over batches (and ranks)."""

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        self.ks = tuple(ks)
        self.reset()

    def reset(self) -> None:
        self.correct: dict[int, int] = {k: 0 for k in self.ks}
        self.total = 0

    def update(self, logits: Tensor, targets: Tensor) -> None:
        for k, n in topk_correct(logits, targets, self.ks).items():
            self.correct[k] += n
        self.total += int(targets.shape[0])

    def compute(self) -> dict[str, float]:
        """Accuracies in percent (0-100), keyed "top1", "top5", ..."""
        if self.total == 0:
            raise RuntimeError("AccuracyMeter.compute() called before any sample was added")
        return {f"top{k}": 100.0 * n / self.total for k, n in self.correct.items()}
