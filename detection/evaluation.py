"""Box evaluation: COCO AP through pycocotools / faster_coco_eval, and PASCAL VOC AP (07 11-point or 2010+ area).

Both evaluators collect predictions in original-image pixels as plain picklable Python objects, so each rank
can evaluate its shard and `extend()` one evaluator with the others' all-gathered `predictions`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from .datasets import ImageRecord

logger = logging.getLogger(__name__)

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
Array = np.ndarray | torch.Tensor


def _coco_backend(name: str) -> tuple[type, type]:
    """(COCO, COCOeval) classes of a backend; both follow the pycocotools API."""
    if name == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    raise ValueError(f"unknown COCO evaluation backend {name!r}; valid: 'faster_coco_eval', 'pycocotools'")


def _coco_api(coco_cls: type, dataset: dict):
    """A COCO index over an in-memory dict (pycocotools' constructor only takes a file name)."""
    coco = coco_cls()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _flat(boxes: Array, scores: Array, labels: Array) -> tuple[torch.Tensor, list[float], list[int]]:
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    scores, labels = torch.as_tensor(scores).reshape(-1).tolist(), torch.as_tensor(labels).reshape(-1).tolist()
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"{len(boxes)} boxes, {len(scores)} scores and {len(labels)} labels do not match")
    return boxes, scores, labels


def _check_labels(labels: list[int], num_classes: int, image_id: int) -> None:
    bad = [label for label in labels if not 1 <= label <= num_classes]
    if bad:
        raise ValueError(f"image id {image_id}: labels {sorted(set(bad))} outside 1..{num_classes}")


class CocoEvaluator:
    """COCO box AP/AR (the 12 numbers of COCOeval.stats) over every image of the ground truth; images without
    predictions count as misses."""

    def __init__(self, coco_gt: dict | str | Path, cat_ids: Sequence[int], backend: str = "faster_coco_eval"):
        _coco_backend(backend)  # fail now, not after a whole evaluation pass
        if isinstance(coco_gt, dict):
            self.coco_gt = coco_gt
        else:
            try:
                self.coco_gt = json.loads(Path(coco_gt).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{coco_gt}: cannot read COCO ground truth json: {e}") from e
        self.cat_ids = [int(c) for c in cat_ids]
        self.backend = backend
        self.predictions: list[dict] = []
        self.pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # {class: (recall, precision)} after compute
        self.pr_scores: dict[str, np.ndarray] = {}  # {class: the score threshold of each point of pr_curves}

    def update(self, image_id: int, boxes: Array, scores: Array, labels: Array) -> None:
        """Detections of one image: boxes xyxy in original-image pixels, labels contiguous 1..K."""
        boxes, scores, labels = _flat(boxes, scores, labels)
        _check_labels(labels, len(self.cat_ids), image_id)
        for box, score, label in zip(box_convert(boxes, "xyxy", "xywh").tolist(), scores, labels):
            self.predictions.append({"image_id": int(image_id), "category_id": self.cat_ids[label - 1],
                                     "bbox": box, "score": float(score)})

    def extend(self, predictions: Sequence[dict]) -> None:
        """Add `predictions` of another evaluator (e.g. all-gathered from other ranks)."""
        self.predictions.extend(predictions)

    def compute(self) -> dict:
        """The 12 COCO stats, then per class AP (IoU .5:.95), AP50 and AR (IoU .5:.95, 100 detections; nan without
        ground truth); the IoU-0.5 precision-recall curves are left in `pr_curves`, their thresholds in `pr_scores`.
        With no predictions COCOeval's own convention holds: 0 where there is ground truth, -1 where an area range
        has none."""
        coco_cls, eval_cls = _coco_backend(self.backend)
        # COCOeval writes into the annotation dicts and loadRes into the detections: hand it copies
        gt_dict = {**self.coco_gt, "annotations": [dict(a) for a in self.coco_gt.get("annotations", [])]}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
            gt = _coco_api(coco_cls, gt_dict)
            image_ids = set(gt.getImgIds())
            detections = [dict(p) for p in self.predictions if p["image_id"] in image_ids]
            if len(detections) < len(self.predictions):
                logger.warning("CocoEvaluator: dropped %d predictions on images absent from the ground truth",
                               len(self.predictions) - len(detections))
            dt = gt.loadRes(detections) if detections else _coco_api(
                coco_cls, {"images": gt_dict["images"], "categories": gt_dict["categories"], "annotations": []})
            coco_eval = eval_cls(gt, dt, iouType="bbox")
            coco_eval.params.imgIds = sorted(image_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics: dict = {name: float(value) for name, value in zip(COCO_STATS, coco_eval.stats)}
        names = {c["id"]: str(c["name"]) for c in gt_dict["categories"]}
        self.pr_curves = per_class_pr(coco_eval, names)
        self.pr_scores = {name: coco_eval.eval["scores"][0, :, k, 0, -1].copy()
                          for k, name in enumerate(self.pr_curves)}
        # COCOeval marks a class without ground truth with -1: nan here, as VOCEvaluator does
        precision = np.where(coco_eval.eval["precision"] < 0, np.nan, coco_eval.eval["precision"])[:, :, :, 0, -1]
        with warnings.catch_warnings():  # [IoU, recall, class] at area "all", 100 detections
            warnings.simplefilter("ignore", RuntimeWarning)  # the mean of an all-nan slice: a class without GT
            metrics["AP_per_class"] = dict(zip(self.pr_curves, np.nanmean(precision, axis=(0, 1)).tolist()))
            metrics["AP50_per_class"] = dict(zip(self.pr_curves, np.nanmean(precision[0], axis=0).tolist()))
            recall = np.where(coco_eval.eval["recall"] < 0, np.nan, coco_eval.eval["recall"])[:, :, 0, -1]
            metrics["AR_per_class"] = dict(zip(self.pr_curves, np.nanmean(recall, axis=0).tolist()))  # [IoU, class]
        return metrics


def per_class_pr(coco_eval, names: dict[int, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{class name: (recall, precision)} of an evaluated COCOeval at IoU 0.5, all areas, 100 detections: its
    101-point interpolated curve (precision -1 where the class has no ground truth), classes in id order."""
    recall = np.asarray(coco_eval.params.recThrs)
    return {names.get(int(c), str(c)): (recall, coco_eval.eval["precision"][0, :, k, 0, -1].copy())
            for k, c in enumerate(coco_eval.params.catIds)}


def records_to_coco(records: Sequence[ImageRecord], class_names: Sequence[str],
                    cat_ids: Sequence[int] | None = None) -> dict:
    """COCO ground truth from records (ignore -> iscrowd=1, area = box area), so VOC or synthetic data can be
    COCO-evaluated. Category ids default to 1..K."""
    cat_ids = list(cat_ids) if cat_ids is not None else list(range(1, len(class_names) + 1))
    images, annotations = [], []
    for r in records:
        images.append({"id": r.image_id, "file_name": Path(r.path).name, "width": r.width, "height": r.height})
        xywh = box_convert(torch.from_numpy(r.boxes.astype(np.float64)).reshape(-1, 4), "xyxy", "xywh").tolist()
        for box, label, ignore in zip(xywh, r.labels.tolist(), r.ignore.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": r.image_id, "category_id": cat_ids[label - 1],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(ignore)})
    categories = [{"id": c, "name": n} for c, n in zip(cat_ids, class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


class Detection(NamedTuple):
    image_id: int
    label: int
    score: float
    box: tuple[float, float, float, float]  # xyxy, original-image pixels


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision from a ranked list's recall / precision curve (hand-written: the VOC devkit's
    definition, which no installed library provides). VOC07: mean over recall 0, 0.1, ..., 1 of the best
    precision at recall >= t. VOC2010+: area under the monotone (right-to-left maximum) precision envelope."""
    if use_07_metric:
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _class_pr(detections: list[Detection], gt: dict[int, tuple[torch.Tensor, np.ndarray]],
              iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray] | None:
    """(recall, precision) down the ranked detections of one class, None without non-difficult ground truth.
    `gt` = {image_id: (boxes, difficult)} of the images that have it: rank by score, match each
    detection to its highest-IoU ground truth (if IoU >= threshold).
    Difficult matches count as neither TP nor FP; a ground truth matched twice makes the later one a FP."""
    num_positives = sum(int((~difficult).sum()) for _, difficult in gt.values())
    if num_positives == 0:
        return None
    detections = sorted(detections, key=lambda d: -d.score)  # stable: ties keep arrival order
    best: list[tuple[float, int]] = [(0.0, -1)] * len(detections)
    by_image: dict[int, list[int]] = defaultdict(list)
    for rank, d in enumerate(detections):
        by_image[d.image_id].append(rank)
    for image_id, ranks in by_image.items():
        if image_id in gt:
            ious = box_iou(torch.tensor([detections[r].box for r in ranks], dtype=torch.float64), gt[image_id][0])
            values, indices = ious.max(dim=1)
            for r, v, i in zip(ranks, values.tolist(), indices.tolist()):
                best[r] = (v, i)
    matched = {image_id: np.zeros(len(difficult), dtype=bool) for image_id, (_, difficult) in gt.items()}
    tp, fp = np.zeros(len(detections)), np.zeros(len(detections))
    for rank, (d, (iou, j)) in enumerate(zip(detections, best)):
        if iou < iou_threshold:
            fp[rank] = 1
        elif gt[d.image_id][1][j]:
            continue  # difficult: neither
        elif matched[d.image_id][j]:
            fp[rank] = 1
        else:
            tp[rank] = matched[d.image_id][j] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return tp / num_positives, precision


class VOCEvaluator:
    """PASCAL VOC AP per class at IoU 0.5 (boxes 0-based exclusive, so IoU uses plain (x2-x1)*(y2-y1) areas).
    Classes without non-difficult ground truth get AP = nan and are left out of the mAP."""

    def __init__(self, records: Sequence[ImageRecord], class_names: Sequence[str], use_07_metric: bool):
        self.records = list(records)
        self.class_names = list(class_names)
        self.use_07_metric = use_07_metric
        self.predictions: list[Detection] = []
        self.pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # {class: (recall, precision)} after compute
        self.pr_scores: dict[str, np.ndarray] = {}  # {class: the score threshold of each point of pr_curves}

    def update(self, image_id: int, boxes: Array, scores: Array, labels: Array) -> None:
        """Detections of one image: boxes xyxy in original-image pixels, labels contiguous 1..K."""
        boxes, scores, labels = _flat(boxes, scores, labels)
        _check_labels(labels, len(self.class_names), image_id)
        for box, score, label in zip(boxes.tolist(), scores, labels):
            self.predictions.append(Detection(int(image_id), int(label), float(score), tuple(box)))

    def extend(self, predictions: Sequence[Detection | tuple]) -> None:
        """Add `predictions` of another evaluator (e.g. all-gathered from other ranks)."""
        self.predictions.extend(Detection(*p) for p in predictions)

    def compute(self) -> dict:
        """{"mAP": float, "AP_per_class": {name: float}}; the curves behind them are left in `pr_curves`, their
        thresholds in `pr_scores`."""
        known = {r.image_id for r in self.records}
        by_class: dict[int, list[Detection]] = defaultdict(list)
        for d in self.predictions:
            if d.image_id in known:
                by_class[d.label].append(d)
        dropped = len(self.predictions) - sum(map(len, by_class.values()))
        if dropped:
            logger.warning("VOCEvaluator: dropped %d predictions on images absent from the records", dropped)
        gt_by_class: dict[int, dict[int, tuple[torch.Tensor, np.ndarray]]] = defaultdict(dict)
        for r in self.records:
            for label in np.unique(r.labels).tolist():
                mask = r.labels == label
                gt_by_class[label][r.image_id] = (torch.as_tensor(r.boxes[mask], dtype=torch.float64), r.ignore[mask])
        curves = {name: _class_pr(by_class[label], gt_by_class[label])
                  for label, name in enumerate(self.class_names, start=1)}
        per_class = {name: math.nan if curve is None else voc_ap(*curve, self.use_07_metric)
                     for name, curve in curves.items()}
        empty = (np.zeros(0), np.zeros(0))
        self.pr_curves = {name: curve or empty for name, curve in curves.items()}  # for plots: rank by rank
        self.pr_scores = {name: np.sort([d.score for d in by_class[label]])[::-1] if curves[name] else np.zeros(0)
                          for label, name in enumerate(self.class_names, start=1)}  # _class_pr's rank order
        valid = [ap for ap in per_class.values() if not math.isnan(ap)]
        return {"mAP": float(np.mean(valid)) if valid else math.nan, "AP_per_class": per_class}


def format_per_class_table(ap_per_class: dict[str, float]) -> str:
    """Markdown table of per-class AP in percent, with the mean over classes that have ground truth."""
    valid = [ap for ap in ap_per_class.values() if not math.isnan(ap)]
    rows = [(name, ap) for name, ap in ap_per_class.items()] + [("**mean**", np.mean(valid) if valid else math.nan)]
    lines = ["| class | AP (%) |", "|---|---:|"]
    lines += [f"| {name} | {'n/a' if math.isnan(ap) else f'{100 * ap:.1f}'} |" for name, ap in rows]
    return "\n".join(lines)
