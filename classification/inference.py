"""Evaluating a classifier on a loader: top-1 / top-5 over all ranks, and the printed summary."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.distributed import all_reduce_sum, is_main_process
from engine.loop import autocast

from .metrics import AccuracyMeter


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 / top-5 (percent) over this rank's shard, counts summed over ranks before dividing.

    Ten-crop batches ([N, 10, 3, H, W]) are flattened through the model and averaged per image.
    """
    model.eval()
    meter = AccuracyMeter((1, 5))
    for images, labels in tqdm(loader, desc="eval", disable=not is_main_process(), leave=False, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images.flatten(0, 1) if images.dim() == 5 else images)
        meter.update(logits.float().view(*images.shape[:-3], -1), labels)
    counts = all_reduce_sum(torch.tensor([*meter.correct.values(), meter.total], device=device)).tolist()
    meter.correct, meter.total = dict(zip(meter.ks, counts[:-1])), counts[-1]
    return meter.compute()


def report(metrics: dict, num_val: int) -> None:
    """The val top-1 / top-5 and the last epoch's train top-1 (None: n/a), on one line."""
    train = f"{metrics['train_top1']:.2f}%" if metrics["train_top1"] is not None else "n/a"
    print(f"val top-1 = {metrics['top1']:.2f}% (error {100 - metrics['top1']:.2f}%)   top-5 = {metrics['top5']:.2f}%   "
          f"on {num_val} images;   train top-1 (last epoch) = {train}")
