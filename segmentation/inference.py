"""Running a segmenter over a loader and scoring it (mIoU), summed across processes."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.distributed import all_gather_object, all_reduce_sum, get_rank, get_world_size, is_main_process

from .evaluation import SegmentationEvaluator, multiscale_flip_inference


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, class_names: Sequence[str], device: torch.device, *,
             scales: Sequence[float] = (1.0,), flip: bool = False, amp_dtype: torch.dtype | None = None,
             evaluator: SegmentationEvaluator | None = None) -> dict:
    """mIoU over all ranks: each rank fills a confusion matrix on its shard, the matrices are summed.

    Summing is exact (unlike averaging per-rank mIoUs), and every rank ends up with the global metrics. The
    `evaluator` passed in (a fresh one by default) keeps the summed matrix and every image's mIoU (keyed by its
    index in the loader's dataset before sharding: `eval_loader` gives rank r every world_size-th sample).
    """
    model.eval()
    if evaluator is None:
        evaluator = SegmentationEvaluator(len(class_names), class_names=class_names)
    rank, world_size, position = get_rank(), get_world_size(), 0
    for image, target in tqdm(loader, desc="eval", disable=not is_main_process(), leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            log_probs = multiscale_flip_inference(model, image.to(device), tuple(scales), flip)
        indices = [rank + world_size * (position + i) for i in range(len(image))]
        evaluator.update(log_probs.argmax(1).cpu(), target, image_indices=indices)
        position += len(image)
    evaluator.confusion = all_reduce_sum(evaluator.confusion.to(device)).cpu()  # nccl needs it on the GPU
    evaluator.image_miou = {k: v for part in all_gather_object(evaluator.image_miou) for k, v in part.items()}
    return evaluator.compute()


def report(metrics: Mapping[str, Any]) -> None:
    print(f"mIoU = {metrics['mIoU']:.3f}   pixel acc = {metrics['pixel_acc']:.3f}   "
          f"mean acc = {metrics['mean_acc']:.3f}")
    # nan (a class absent from labels and predictions) is None once the metrics went through a checkpoint
    print(json.dumps({k: None if v is None else round(v, 3) for k, v in metrics["IoU_per_class"].items()}, indent=1))
