"""Running a segmenter over a loader and scoring it (mIoU), summed across processes."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.distributed import all_reduce_sum, is_main_process

from .evaluation import SegmentationEvaluator, multiscale_flip_inference


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, class_names: Sequence[str], device: torch.device, *,
             scales: Sequence[float] = (1.0,), flip: bool = False, amp_dtype: torch.dtype | None = None) -> dict:
    """mIoU over all ranks: each rank fills a confusion matrix on its shard, the matrices are summed.

    Summing is exact (unlike averaging per-rank mIoUs), and every rank ends up with the global metrics.
    """
    model.eval()
    evaluator = SegmentationEvaluator(len(class_names), class_names=class_names)
    for image, target in tqdm(loader, desc="eval", disable=not is_main_process(), leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            log_probs = multiscale_flip_inference(model, image.to(device), tuple(scales), flip)
        evaluator.update(log_probs.argmax(1).cpu(), target)
    evaluator.confusion = all_reduce_sum(evaluator.confusion.to(device)).cpu()  # nccl needs it on the GPU
    return evaluator.compute()


def report(metrics: Mapping[str, Any]) -> None:
    print(f"mIoU = {metrics['mIoU']:.3f}   pixel acc = {metrics['pixel_acc']:.3f}   "
          f"mean acc = {metrics['mean_acc']:.3f}")
    # nan (a class absent from labels and predictions) is None once the metrics went through a checkpoint
    print(json.dumps({k: None if v is None else round(v, 3) for k, v in metrics["IoU_per_class"].items()}, indent=1))
