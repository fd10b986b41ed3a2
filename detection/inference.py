"""Running a detector over a loader and scoring it, gathered across processes; test-time augmentation; the
printed summary."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from engine.distributed import gather_object, is_main_process

from .evaluation import CocoEvaluator, VOCEvaluator
from .ranking import batched_nms


def to_original_size(boxes: torch.Tensor, image: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
    """Boxes predicted on the resized image -> pixels of the original image (what the GT uses)."""
    height, width = image.shape[-2:]
    orig_h, orig_w = orig_size
    scale = boxes.new_tensor([orig_w / width, orig_h / height, orig_w / width, orig_h / height])
    return boxes * scale


def _hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([width - x1, y0, width - x0, y1], dim=-1)


@torch.no_grad()
def detect(model: nn.Module, images: list[torch.Tensor], scales: Sequence[float] = (1.0,),
           flip: bool = False) -> list[dict[str, torch.Tensor]]:
    """The model's detections on `images` (boxes in each image's pixels).

    With test-time augmentation every image is also run rescaled by each of `scales` (bilinear) and, with
    `flip`, mirrored; all views' detections, mapped back to the image, are merged by the model's own
    class-wise NMS and top-k (Detectron2's GeneralizedRCNNWithTTA merges the same way).
    """
    scales = tuple(float(s) for s in scales)
    if not scales:
        raise ValueError("detect needs at least one scale")
    if scales == (1.0,) and not flip:
        return model(images)
    roi_heads = getattr(model, "module", model).roi_heads  # DDP-wrapped or not
    views: list[list[dict[str, torch.Tensor]]] = [[] for _ in images]
    for scale in scales:
        scaled = [image if scale == 1.0 else F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                                                           align_corners=False, recompute_scale_factor=True)[0]
                  for image in images]
        for flipped in (False, True) if flip else (False,):
            outputs = model([s.flip(-1) for s in scaled] if flipped else scaled)
            for view, image, s, out in zip(views, images, scaled, outputs):
                boxes = _hflip_boxes(out["boxes"], s.shape[-1]) if flipped else out["boxes"]
                view.append({**out, "boxes": to_original_size(boxes, s, tuple(image.shape[-2:]))})
    merged = []
    for view in views:
        boxes, scores, labels = (torch.cat([v[key] for v in view]) for key in ("boxes", "scores", "labels"))
        keep = batched_nms(boxes.float(), scores.float(), labels, roi_heads.nms_thresh,
                           roi_heads.box_predictor.cls_score.out_features)[: roi_heads.detections_per_img]
        merged.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return merged


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, evaluator: CocoEvaluator | VOCEvaluator, device: torch.device,
             *, amp_dtype: torch.dtype | None = None, scales: Sequence[float] = (1.0,), flip: bool = False) -> dict:
    """Predict every image of `loader` (this process's shard; `scales` / `flip`: test-time augmentation,
    see `detect`), gather predictions on rank 0, compute the metrics there. Other ranks return {}."""
    model.eval()
    for images, targets in tqdm(loader, desc="eval", disable=not is_main_process(), dynamic_ncols=True):
        if not images:  # every image of the batch was skipped (data.skip_invalid)
            continue
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = detect(model, [image.to(device) for image in images], scales, flip)
        for image, target, output in zip(images, targets, outputs):
            boxes = to_original_size(output["boxes"].float().cpu(), image, target["orig_size"])
            evaluator.update(target["image_id"], boxes, output["scores"].float().cpu(), output["labels"].cpu())
    gathered = gather_object(evaluator.predictions)  # to rank 0 only: it alone scores them
    if not is_main_process():
        return {}
    for predictions in gathered[1:]:
        evaluator.extend(predictions)
    return evaluator.compute()


def report(metrics: Mapping[str, Any]) -> None:
    """COCO's three headline APs, or the VOC mAP with the AP of each class."""
    if "AP" in metrics:
        print(f"COCO-style mAP@[.5:.95] = {metrics['AP']:.3f}   AP50 = {metrics['AP50']:.3f}   AP75 = {metrics['AP75']:.3f}")
    else:
        print(f"VOC mAP = {metrics['mAP']:.3f}")
        print(json.dumps(metrics["AP_per_class"], indent=1))
