"""Why a detector loses AP: the error breakdown of TIDE (Bolya et al., "TIDE: A General Toolbox for Identifying
Object Detection Errors", ECCV 2020), at IoU 0.5.

Hand-written: the reference implementation (`tidecv`) is unmaintained and needs numpy < 2, and neither
faster-coco-eval nor pycocotools classify false positives. The rules are TIDE's (its `quantify.py`), the AP is
COCO's (101 recall points, at most 100 detections per image and class, crowd regions ignored), so the baseline AP
here equals COCOeval's AP50 on the same ground truth (tests/test_report.py checks both).

Every detection that is not a true positive at IoU >= 0.5 gets exactly one error type, in this order:
  localisation: right class, best same-class IoU in [0.1, 0.5) ("would be positive if boxed better");
  classification: IoU >= 0.5 with a ground truth of another class ("would be positive with the right class");
  duplicate: IoU >= 0.5 with a same-class ground truth already matched by a higher-scoring detection;
  background: IoU <= 0.1 with every ground truth (also every detection on an image without objects);
  both: the rest (wrong class and IoU in (0.1, 0.5) with that class's object).
A ground truth no detection matched is "missed" unless a localisation or classification error points at it.

The AP an error type costs is the AP gained by fixing only those errors (TIDE's oracles): a classification or
localisation error becomes the true positive of its ground truth (the highest-scoring such error per ground
truth; the others, and those pointing at an already matched object, are removed), duplicates, background and
"both" errors are removed, missed objects are removed from the ground truth. "False positives" removes every
false positive and "false negatives" every unmatched object: the AP at perfect precision and at perfect recall.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
SPECIAL_TYPES = ("false positives", "false negatives")
CLS, LOC, BOTH, DUPE, BKG = range(5)  # codes of the detection error types, in ERROR_TYPES order
NONE = -1  # true positive, or a detection ignored on a crowd region
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs
MAX_DETECTIONS = 100  # COCOeval's maxDets[-1], per image and class


@dataclass
class ErrorBreakdown:
    """AP at IoU `pos_thresh` (COCO's 101-point AP, a fraction) and what each error type costs, overall (mean over
    classes with ground truth) and per class; `counts` are detections (objects for "missed") of each type."""

    pos_thresh: float
    bg_thresh: float
    ap: float
    ap_per_class: dict[str, float]
    delta: dict[str, float]  # error type (ERROR_TYPES + SPECIAL_TYPES) -> AP gained when fixed
    delta_per_class: dict[str, dict[str, float]]  # class -> error type -> AP gained when fixed
    counts: dict[str, int]
    counts_per_class: dict[str, dict[str, int]]


def _xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _iou(a: np.ndarray, b: np.ndarray, crowd: bool = False) -> np.ndarray:
    """[len(a), len(b)] IoU of xyxy boxes; with `crowd` the intersection over the area of `a` (COCO's rule for
    crowd regions)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)[:, None]
    if crowd:
        union = np.broadcast_to(area_a, inter.shape)
    else:
        union = area_a + np.prod(b[:, 2:] - b[:, :2], axis=1)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _match_image(boxes: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                 crowd_boxes: np.ndarray, crowd_labels: np.ndarray, pos: float, bg: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image, detections sorted by score: (tp, error code, target ground truth (-1: none), matched ground
    truth) arrays. Matching is COCO's: each detection in score order takes the unmatched same-class object of
    highest IoU >= pos; one left without takes a same-class crowd region (IoU = intersection / its own area) and
    is ignored (tp False, error NONE)."""
    n, m = len(boxes), len(gt_boxes)
    tp = np.zeros(n, dtype=bool)
    error = np.full(n, NONE, dtype=np.int64)
    target = np.full(n, -1, dtype=np.int64)
    gt_used = np.zeros(m, dtype=bool)
    iou = _iou(boxes, gt_boxes) if m else np.zeros((n, 0))
    same = labels[:, None] == gt_labels[None, :]
    same_iou = np.where(same, iou, 0.0)
    for i in np.flatnonzero((same_iou >= pos).any(axis=1)):  # only these can match: the greedy pass is short
        candidates = np.where(gt_used, -1.0, same_iou[i])
        j = int(np.argmax(candidates))
        if candidates[j] >= pos:
            tp[i], gt_used[j], target[i] = True, True, j
    unmatched = ~tp
    if len(crowd_boxes) and unmatched.any():
        crowd_iou = _iou(boxes, crowd_boxes, crowd=True)
        on_crowd = ((crowd_iou >= pos) & (labels[:, None] == crowd_labels[None, :])).any(axis=1)
        unmatched &= ~on_crowd
    if not m:
        error[unmatched] = BKG
        return tp, error, target, gt_used
    # TIDE's order of tests; each later test only sees detections the earlier ones left
    other_iou = np.where(same, 0.0, iou)
    used_same_iou = same_iou * gt_used[None, :]
    rules = (
        (LOC, (same_iou.max(1) >= bg) & (same_iou.max(1) < pos), same_iou.argmax(1)),
        (CLS, other_iou.max(1) >= pos, other_iou.argmax(1)),
        (DUPE, used_same_iou.max(1) >= pos, used_same_iou.argmax(1)),
        (BKG, iou.max(1) <= bg, np.full(n, -1)),
    )
    left = unmatched.copy()
    for code, applies, towards in rules:
        hit = left & applies
        error[hit], target[hit] = code, towards[hit]
        left &= ~hit
    error[left] = BOTH
    return tp, error, target, gt_used


def _class_ap(labels: np.ndarray, tp: np.ndarray, keep: np.ndarray, num_positives: np.ndarray) -> np.ndarray:
    """COCO's interpolated AP per class (nan where the class has no ground truth in the evaluation, 0 where fixing
    removed all of it, as TIDE) from detections already in COCO's rank order."""
    aps = np.full(len(num_positives), np.nan)
    for k, npig in enumerate(num_positives):
        if npig < 0:
            continue
        if npig == 0:
            aps[k] = 0.0
            continue
        hits = tp[keep & (labels == k)]
        tps = np.cumsum(hits)
        fps = np.cumsum(~hits)
        recall = tps / npig
        precision = tps / np.maximum(tps + fps, np.spacing(1))
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # COCO's envelope, right to left
        index = np.searchsorted(recall, RECALL_POINTS, side="left")
        aps[k] = np.where(index < len(precision), precision[np.minimum(index, len(precision) - 1)], 0.0).mean() \
            if len(precision) else 0.0
    return aps


def analyze_errors(coco_gt: dict, detections: Sequence[dict], pos_thresh: float = 0.5,
                   bg_thresh: float = 0.1) -> ErrorBreakdown:
    """The breakdown of `detections` (COCO results: image_id, category_id, bbox xywh, score) against `coco_gt`
    (a COCO instances dict; iscrowd / ignore objects are regions whose detections are ignored). Detections on
    images absent from `coco_gt` are dropped, as COCOeval does."""
    categories = sorted(coco_gt["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in categories]
    label_of = {c["id"]: k for k, c in enumerate(categories)}
    image_rank = {image["id"]: r for r, image in enumerate(sorted(coco_gt["images"], key=lambda i: i["id"]))}

    objects, crowds = defaultdict(list), defaultdict(list)
    for ann in coco_gt.get("annotations", []):
        if ann["category_id"] in label_of and ann["image_id"] in image_rank:
            ignored = ann.get("iscrowd", 0) or ann.get("ignore", 0)
            (crowds if ignored else objects)[ann["image_id"]].append((ann["bbox"], label_of[ann["category_id"]]))
    per_image = defaultdict(list)
    for position, d in enumerate(detections):
        if d["image_id"] in image_rank and d["category_id"] in label_of:
            per_image[d["image_id"]].append((-float(d["score"]), label_of[d["category_id"]], position, d["bbox"]))

    # per detection, in the order COCOeval ranks them: image by image, within one by score (stable), <= 100 a class
    det_label, det_score, det_rank, det_tp, det_error, det_target = [], [], [], [], [], []
    gt_label, gt_used = [], []
    for image_id in sorted(image_rank, key=image_rank.get):
        gts, crowd = objects.get(image_id, []), crowds.get(image_id, [])
        gt_boxes = _xyxy([b for b, _ in gts])
        gt_labels = np.asarray([label for _, label in gts], dtype=np.int64)
        entries = sorted(per_image.get(image_id, []), key=lambda e: e[0])
        seen: dict[int, int] = defaultdict(int)
        kept = []
        for entry in entries:
            seen[entry[1]] += 1
            if seen[entry[1]] <= MAX_DETECTIONS:
                kept.append(entry)
        boxes = _xyxy([e[3] for e in kept])
        labels = np.asarray([e[1] for e in kept], dtype=np.int64)
        tp, error, target, used = _match_image(
            boxes, labels, gt_boxes, gt_labels, _xyxy([b for b, _ in crowd]),
            np.asarray([label for _, label in crowd], dtype=np.int64), pos_thresh, bg_thresh)
        offset = len(gt_label)
        det_label.append(labels)
        det_score.append(np.asarray([-e[0] for e in kept]))
        det_rank.append(np.full(len(kept), image_rank[image_id]))
        det_tp.append(tp)
        det_error.append(error)
        det_target.append(np.where(target >= 0, target + offset, -1))
        gt_label.append(gt_labels)
        gt_used.append(used)

    label, score, image, tp, error, target = (np.concatenate(a) if a else np.zeros(0) for a in (
        det_label, det_score, det_rank, det_tp, det_error, det_target))
    label, image, error, target = (a.astype(np.int64) for a in (label, image, error, target))
    tp = tp.astype(bool)
    gt_label = np.concatenate(gt_label).astype(np.int64) if gt_label else np.zeros(0, dtype=np.int64)
    gt_used = np.concatenate(gt_used).astype(bool) if gt_used else np.zeros(0, dtype=bool)
    # COCOeval's ranking: a stable sort by score of the per-image lists concatenated in image order
    order = np.lexsort((np.arange(len(score)), image, -score))
    label, score, tp, error, target = label[order], score[order], tp[order], error[order], target[order]

    ignored = ~tp & (error == NONE)
    fixable = (error == CLS) | (error == LOC)
    gt_fixable_open = np.zeros(len(gt_label), dtype=bool)  # TIDE's "usable": an unmatched object an error points at
    open_target = fixable & ~gt_used[np.maximum(target, 0)] & (target >= 0)
    gt_fixable_open[target[open_target]] = True
    missed = ~gt_used & ~gt_fixable_open
    # the highest-scoring classification / localisation error of each unmatched object is the one a fix promotes
    best = np.zeros(len(label), dtype=bool)
    first_of_target = np.unique(target[open_target], return_index=True)[1]  # rank order: first = highest score
    best[np.flatnonzero(open_target)[first_of_target]] = True

    num_classes = len(names)
    positives = np.bincount(gt_label, minlength=num_classes).astype(np.int64)
    positives_eval = np.where(positives > 0, positives, -1)  # classes without ground truth: not evaluated
    keep = ~ignored

    def ap_of(det_labels: np.ndarray, hits: np.ndarray, kept: np.ndarray, npig: np.ndarray = positives_eval):
        return _class_ap(det_labels, hits, kept, npig)

    base = ap_of(label, tp, keep)
    fixed: dict[str, np.ndarray] = {}
    for name, code in (("classification", CLS), ("localisation", LOC)):
        hit = error == code
        promoted = hit & best
        fixed_labels = np.where(promoted, gt_label[np.maximum(target, 0)], label)
        fixed[name] = ap_of(fixed_labels, tp | promoted, keep & ~(hit & ~best))
    for name, code in (("both", BOTH), ("duplicate", DUPE), ("background", BKG)):
        fixed[name] = ap_of(label, tp, keep & (error != code))
    still_there = positives - np.bincount(gt_label[missed], minlength=num_classes)
    fixed["missed"] = ap_of(label, tp, keep, np.where(positives > 0, still_there, -1))
    fixed["false positives"] = ap_of(label, tp, keep & tp)
    matched = np.bincount(gt_label[gt_used], minlength=num_classes)
    fixed["false negatives"] = ap_of(label, tp, keep, np.where(positives > 0, matched, -1))

    evaluated = positives > 0
    mean = (lambda aps: float(np.mean(aps[evaluated]))) if evaluated.any() else (lambda aps: float("nan"))
    counts_per_code = {name: np.bincount(label[error == code], minlength=num_classes)
                       for name, code in zip(ERROR_TYPES, (CLS, LOC, BOTH, DUPE, BKG))}
    counts_per_code["missed"] = np.bincount(gt_label[missed], minlength=num_classes)
    return ErrorBreakdown(
        pos_thresh=pos_thresh, bg_thresh=bg_thresh, ap=mean(base),
        ap_per_class={n: float(base[k]) for k, n in enumerate(names)},
        delta={name: mean(aps) - mean(base) for name, aps in fixed.items()},
        delta_per_class={n: {name: float(aps[k] - base[k]) for name, aps in fixed.items()}
                         for k, n in enumerate(names)},
        counts={name: int(c.sum()) for name, c in counts_per_code.items()},
        counts_per_class={n: {name: int(c[k]) for name, c in counts_per_code.items()} for k, n in enumerate(names)},
    )
