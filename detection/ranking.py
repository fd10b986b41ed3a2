"""Where the detector ranks candidates (the RPN's top-n per level, NMS, the order NMS returns), one answer in eager
PyTorch, TorchScript and ONNX: equal scores go in index order.

Equal scores are common, not a corner case: anchors over an image's zero padding see identical features, so their
objectness logits are exactly equal, and confident sigmoid / softmax scores round to the same float32. `torch.topk`
and an unstable `torch.sort` order such ties as their algorithm happens to, ONNX's TopK by index; the order decides
which of two equal candidates survives a cut or NMS. On a raccoon photograph that moved 3 of 4 confident ONNX
detections by 24 px (docs/export.md). Here a stable sort gives index order in eager PyTorch and TorchScript, and the
ONNX export keeps TopK, which breaks ties the same way (torch.onnx cannot export a stable sort).

NMS itself is the other place where a trace departs from eager PyTorch: torchvision's `batched_nms` runs per
group (FPN level, class) above 4,000 box coordinates on the CPU, but always with its coordinate trick (every
group's boxes shifted apart by a float32 offset) when traced, and the offsets' rounding can flip a near-tie (IoU
at the threshold): a BCCD image lost a 0.50-score detection that way in TorchScript. `batched_nms` below keeps
eager's choice in the graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

PER_GROUP_ABOVE = 4000
"""torchvision's choice on the CPU: above this many box coordinates, one NMS per group (100,000 on CUDA)."""


def descending_order(values: Tensor, k: Tensor | int | None = None) -> Tensor:
    """Indices of the `k` highest `values` along the last dimension (all of them without `k`), high to low, equal
    values in index order."""
    if torch.onnx.is_in_onnx_export():  # exported as TopK, whose ties are in index order by its definition
        return values.sort(descending=True)[1] if k is None else values.topk(k)[1]
    order = values.sort(descending=True, stable=True)[1]
    return order if k is None else order[..., :k]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, num_groups: int) -> Tensor:
    """`torchvision.ops.batched_nms`, kept indices highest score first, equal scores in index order.

    Eager: per-group NMS above `PER_GROUP_ABOVE` coordinates (100,000 on CUDA), the coordinate trick below, as
    torchvision chooses. Traced (ONNX, TorchScript): both are computed and the size picks one inside the graph
    (control flow would not survive the ONNX export). Groups are 0..num_groups-1 (FPN levels in the RPN, labels
    in the RoI heads). NMS keeps the earlier of two equal scores in torchvision and in onnxruntime alike."""
    tracing = torch.jit.is_tracing()
    many = boxes.numel() > (PER_GROUP_ABOVE if boxes.device.type == "cpu" else 100_000)  # eager's choice
    if tracing or many:
        per_group = torch.zeros_like(scores, dtype=torch.bool)
        # traced: a fixed loop (a group without boxes keeps nothing); eager: the groups present, as torchvision
        for group in range(num_groups) if tracing else torch.unique(idxs):
            members = torch.where(idxs == group)[0]
            per_group[members[box_ops.nms(boxes[members], scores[members], iou_threshold)]] = True
    if tracing or not many:
        shifted = torch.zeros_like(scores, dtype=torch.bool)
        shifted[box_ops._batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)] = True
    if tracing:
        vanilla = torch._shape_as_tensor(boxes).prod() > PER_GROUP_ABOVE  # a tensor, so the trace keeps the test
        kept = (per_group & vanilla) | (shifted & ~vanilla)  # (onnxruntime has no boolean Where)
    else:
        kept = per_group if many else shifted
    keep = torch.where(kept)[0]
    return keep[descending_order(scores[keep])]


class TieOrderedRPN(RegionProposalNetwork):
    """torchvision's RPN, ranking equal scores in index order in its per-level top-n and its NMS."""

    def _get_top_n_idx(self, objectness: Tensor, num_anchors_per_level: list[int]) -> Tensor:
        top_n, offset = [], 0
        for level in objectness.split(num_anchors_per_level, 1):
            top_n.append(descending_order(level, det_utils._topk_min(level, self.pre_nms_top_n(), 1)) + offset)
            offset += level.shape[1]
        return torch.cat(top_n, dim=1)

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's, step for step, with this module's `batched_nms`."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), level, dtype=torch.int64, device=proposals.device)
                            for level, n in enumerate(num_anchors_per_level)]).reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        objectness, levels, proposals = (t[batch_idx, top_n_idx] for t in (objectness, levels, proposals))
        final_boxes, final_scores = [], []
        for boxes, scores, level, image_shape in zip(proposals, torch.sigmoid(objectness), levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            boxes, scores, level = boxes[keep], scores[keep], level[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, level = boxes[keep], scores[keep], level[keep]
            keep = batched_nms(boxes, scores, level, self.nms_thresh, len(num_anchors_per_level))
            keep = keep[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


class TieOrderedRoIHeads(RoIHeads):
    """torchvision's box heads, with this module's `batched_nms` in the final per-class NMS."""

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                               image_shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """torchvision's, step for step, with this module's `batched_nms`."""
        num_classes = class_logits.shape[-1]
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(boxes_per_image, 0)
        pred_scores = F.softmax(class_logits, -1).split(boxes_per_image, 0)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=class_logits.device).view(1, -1).expand_as(scores)
            # every class prediction but the background's becomes one candidate
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh, num_classes)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels
