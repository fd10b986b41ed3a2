"""Running a detector over a loader and scoring it, gathered across processes."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.distributed import all_gather_object, is_main_process

from .evaluation import CocoEvaluator, VOCEvaluator


def to_original_size(boxes: torch.Tensor, image: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
    """Boxes predicted on the resized image -> pixels of the original image (what the GT uses)."""
    height, width = image.shape[-2:]
    orig_h, orig_w = orig_size
    scale = boxes.new_tensor([orig_w / width, orig_h / height, orig_w / width, orig_h / height])
    return boxes * scale


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, evaluator: CocoEvaluator | VOCEvaluator, device: torch.device,
             *, amp_dtype: torch.dtype | None = None) -> dict:
    """Predict every image of `loader` (this process's shard), gather predictions on rank 0, compute
    the metrics there. Other ranks return {}."""
    model.eval()
    for images, targets in tqdm(loader, desc="eval", disable=not is_main_process(), dynamic_ncols=True):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model([image.to(device) for image in images])
        for image, target, output in zip(images, targets, outputs):
            boxes = to_original_size(output["boxes"].float().cpu(), image, target["orig_size"])
            evaluator.update(target["image_id"], boxes, output["scores"].float().cpu(), output["labels"].cpu())
    gathered = all_gather_object(evaluator.predictions)
    if not is_main_process():
        return {}
    for predictions in gathered[1:]:
        evaluator.extend(predictions)
    return evaluator.compute()
