"""The detection evaluation page (engine.report): headline metrics, per-class table, COCO's size breakdown,
interactive precision-recall curves, a confusion matrix with background, the TIDE-style error breakdown, the images
with the most errors drawn, the training curves; and the page of training / val samples after the transforms.

Where the parts come from: AP / AR and the PR curves (with their score thresholds) are the evaluator's own
COCOeval run (faster-coco-eval or pycocotools), so every number equals metrics.json; the matching behind the
confusion matrix and the gallery is faster-coco-eval's (COCOeval_faster with extra_calc, as its
`faster_coco_eval.extra.ExtraEval` runs it; IoU 0.5, class-agnostic for the matrix, per class for the gallery); the
error breakdown is detection.error_analysis
(hand-written, TIDE's rules); charts are plotly, boxes are drawn with torchvision's draw_bounding_boxes.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import plotly.graph_objects as go
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from datafiles.images import read_image
from engine.random_state import sample_seed
from engine.report import (GalleryItem, Section, Table, figure_html, history_section, percent, prepare_report_dir,
                           provenance, save_gallery_image, write_page)
from engine.sampling import SeededDataset

from .build import build_dataset, load_split
from .datasets import ImageRecord
from .error_analysis import ERROR_TYPES, SPECIAL_TYPES, ErrorBreakdown, analyze_errors
from .evaluation import CocoEvaluator, VOCEvaluator, records_to_coco

IOU_THRESH = 0.5  # the matching of the confusion matrix, the gallery and the error breakdown
SCORE_THRESH = 0.5  # detections drawn and counted in the confusion matrix and the gallery
COLOURS = {"true positive": "#1a9e3a", "false positive": "#d62728", "missed": "#ff9f1c"}
CLASS_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b", "#bcbd22",
                 "#7f7f7f")  # the data page's boxes, one per class (cycled): matplotlib's tab10
COCO_AREAS = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, math.inf))
MAX_CURVE_POINTS = 400  # VOC's rank-by-rank curves are thinned to this many points per class for the page
MAX_ANNOTATED_CLASSES = 25  # the confusion matrix carries its counts in the cells (and as a table) up to this many
MIN_DRAWN_SIDE = 480  # smaller images are drawn enlarged (whole pixels repeated), so labels stay readable


def write_detection_report(out_dir: str | Path, *, cfg: DictConfig, metrics: dict[str, Any],
                           evaluator: CocoEvaluator | VOCEvaluator, records: Sequence[ImageRecord],
                           run_dir: str | Path | None = None, checkpoint: str | Path | None = None,
                           config_path: str | Path | None = None, gallery_size: int = 24,
                           title: str = "Detection evaluation") -> Path:
    """The page for one evaluation into `out_dir` (replacing an earlier report there); `evaluator` is the one that
    produced `metrics` (after compute), `records` its val images; training curves come from
    `run_dir/history.jsonl` when there is one. Returns the path of index.html."""
    out_dir = prepare_report_dir(out_dir)
    coco_gt, detections = _ground_truth_and_detections(evaluator, records)
    names = [str(c["name"]) for c in sorted(coco_gt["categories"], key=lambda c: c["id"])]
    objects = Counter(a["category_id"] for a in coco_gt["annotations"] if not _ignored(a))
    name_of = {c["id"]: str(c["name"]) for c in coco_gt["categories"]}
    object_counts = {name: objects.get(cat_id, 0) for cat_id, name in sorted(name_of.items())}
    detection_counts = Counter(name_of.get(d["category_id"]) for d in detections)
    breakdown = analyze_errors(coco_gt, detections, pos_thresh=IOU_THRESH)

    sections = [_headline(metrics, breakdown, len(records), len(detections)),
                _per_class(metrics, object_counts, detection_counts),
                _sizes(metrics, coco_gt),
                _pr_curves(evaluator, metrics),
                _confusion(coco_gt, detections),
                _errors(breakdown),
                _gallery(out_dir, coco_gt, detections, records, gallery_size)]
    curves = history_section(run_dir)
    if curves is not None:
        sections.append(curves)
    data = (f"{cfg.data.format} val split" + (f" ({cfg.data.val.annotations})" if cfg.data.format == "coco"
                                              else f" ({cfg.data.root}, {cfg.data.val.split})"))
    rows = provenance(cfg, checkpoint=checkpoint, data=data, images=len(records), config_path=config_path)
    metric = "COCO AP@[.5:.95]" if "AP" in metrics else f"VOC mAP ({cfg.eval.metric})"
    headline = metrics.get("AP", metrics.get("mAP"))
    subtitle = f"{metric} {percent(headline)[0]} % on {len(records)} val images, {len(names)} classes"
    return write_page(out_dir, title=title, subtitle=subtitle, sections=sections, provenance_rows=rows,
                      config_text=OmegaConf.to_yaml(cfg))


def _ignored(annotation: dict) -> bool:
    return bool(annotation.get("iscrowd", 0) or annotation.get("ignore", 0))


def _ground_truth_and_detections(evaluator: CocoEvaluator | VOCEvaluator, records: Sequence[ImageRecord]
                                 ) -> tuple[dict, list[dict]]:
    """COCO ground truth and COCO results for either evaluator (VOC: difficult objects become ignored regions,
    category ids 1..K)."""
    if isinstance(evaluator, CocoEvaluator):
        return evaluator.coco_gt, evaluator.predictions
    gt = records_to_coco(records, evaluator.class_names)
    boxes = box_convert(torch.tensor([d.box for d in evaluator.predictions], dtype=torch.float64).reshape(-1, 4),
                        "xyxy", "xywh").tolist()
    detections = [{"image_id": d.image_id, "category_id": d.label, "bbox": box, "score": d.score}
                  for d, box in zip(evaluator.predictions, boxes)]
    return gt, detections


class Matched(NamedTuple):
    """Ground truth and the detections scoring >= SCORE_THRESH as faster-coco-eval COCO indexes (annotation id ->
    annotation), and which detection took which ground truth (crowd regions included) at IoU IOU_THRESH."""

    gt: dict[int, dict]
    dt: dict[int, dict]
    dt_to_gt: dict[int, int]


def match(coco_gt: dict, detections: Sequence[dict], use_cats: bool) -> Matched:
    """faster-coco-eval's matching at one IoU (COCOeval_faster with extra_calc, set up as
    `faster_coco_eval.extra.ExtraEval.evaluate` does: all areas, no cap on detections), called directly: ExtraEval
    first deep-copies both datasets, ~20 s per 1,000 images of 100 detections. use_cats=False: a detection may take
    an object of any class (the confusion matrix); True: only of its own (true / false positives)."""
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO()
    gt.dataset = {**coco_gt, "annotations": [dict(a) for a in coco_gt["annotations"]]}
    gt.createIndex()
    kept = [dict(d) for d in detections if d["score"] >= SCORE_THRESH and d["image_id"] in gt.imgs]
    if not kept:
        return Matched(gt.anns, {}, {})
    dt = gt.loadRes(kept)
    evaluation = COCOeval_faster(gt, dt, "bbox", extra_calc=True, print_function=lambda *_: None)
    evaluation.params.maxDets = [max(1000, len(dt.anns))]
    evaluation.params.iouThrs = [IOU_THRESH]
    evaluation.params.areaRng = [[0, 1e10]]
    evaluation.params.useCats = int(use_cats)
    evaluation.evaluate()
    evaluation.accumulate()
    pairs = (key.split("_", 1) for key in evaluation.eval["matched"])
    return Matched(gt.anns, dt.anns, {int(d): int(g) for d, g in pairs})


def _headline(metrics: dict, breakdown: ErrorBreakdown, images: int, detections: int) -> Section:
    if "AP" in metrics:
        keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
        text = ["COCO metrics (IoU 0.50:0.95 unless named; s / m / l: objects under 32², up to 96², above 96² "
                "pixels; AR at 1, 10, 100 detections per image), in percent, as in metrics.json."]
    else:
        keys = ("mAP",)
        text = ["PASCAL VOC mean AP at IoU 0.5 (eval.metric), in percent, as in metrics.json."]
    rows = [[key, percent(metrics.get(key))] for key in keys]
    worst = max(ERROR_TYPES, key=lambda e: breakdown.delta[e]) if detections else None
    if worst is not None and breakdown.delta[worst] > 0:
        text.append(f"The largest error: {worst} (fixing it would add {100 * breakdown.delta[worst]:.1f} AP50 "
                    f"points, see the error breakdown). {detections} detections on {images} images.")
    return Section("summary", "Headline metrics", text=text, tables=[Table("headline-table", ("metric", "%"), rows)])


def _per_class(metrics: dict, objects: dict[str, int], detections: Counter) -> Section:
    coco = "AP50_per_class" in metrics
    columns = ("class", "objects", "detections", "AP", "AP50", "AR") if coco else ("class", "objects", "detections",
                                                                                 "AP")
    rows = []
    for name in metrics["AP_per_class"]:
        row = [name, (str(objects.get(name, 0)), objects.get(name, 0)),
               (str(detections.get(name, 0)), detections.get(name, 0)), percent(metrics["AP_per_class"][name])]
        if coco:
            row += [percent(metrics["AP50_per_class"][name]), percent(metrics.get("AR_per_class", {}).get(name))]
        rows.append(row)
    text = ["Per class, in percent, as in metrics.json: AP over IoU 0.50:0.95, AP50 at IoU 0.5, AR at IoU 0.50:0.95 "
            "with 100 detections per image" if coco else "Per class VOC AP at IoU 0.5, in percent, as in "
            "metrics.json", "Objects: ground truth (crowd / difficult regions not counted); detections: all the model "
            "returned (score >= model.roi.score_thresh). n/a: no ground truth of the class. Click a header to sort."]
    return Section("classes", "Per class", text=text, tables=[Table("per-class-table", columns, rows)])


def _sizes(metrics: dict, coco_gt: dict) -> Section:
    counts = Counter()
    for a in coco_gt["annotations"]:
        if not _ignored(a):
            area = a.get("area") or a["bbox"][2] * a["bbox"][3]
            counts[next(name for name, low, high in COCO_AREAS if low <= area < high)] += 1
    if "APs" not in metrics:
        text = ["COCO's size breakdown comes with eval.metric=coco; object counts per size:"]
        rows = [[name, (str(counts[name]), counts[name]), "n/a", "n/a"] for name, _, _ in COCO_AREAS]
    else:
        text = ["COCO's breakdown by object area (small < 32², medium < 96², large >= 96² pixels), in percent, as in "
                "metrics.json; n/a: no objects of that size (COCO's -1)."]
        rows = [[name, (str(counts[name]), counts[name]), percent(metrics[f"AP{name[0]}"]),
                 percent(metrics[f"AR{name[0]}"])] for name, _, _ in COCO_AREAS]
    return Section("sizes", "Object sizes", text=text, tables=[Table("size-table", ("size", "objects", "AP", "AR"),
                                                                     rows)])


def _pr_curves(evaluator: CocoEvaluator | VOCEvaluator, metrics: dict) -> Section:
    """One trace per class with ground truth; hover shows recall, precision and the score threshold."""
    fig = go.Figure()
    ap_key = "AP50_per_class" if "AP50_per_class" in metrics else "AP_per_class"
    for name, (recall, precision) in evaluator.pr_curves.items():
        scores = evaluator.pr_scores.get(name, np.zeros(0))
        valid = precision >= 0  # COCOeval: -1 beyond the recall reached / without ground truth
        recall, precision, scores = recall[valid], precision[valid], scores[valid]
        if not len(recall) and metrics[ap_key].get(name) is None:
            continue  # no ground truth: no curve
        if len(recall) > MAX_CURVE_POINTS:
            keep = np.unique(np.linspace(0, len(recall) - 1, MAX_CURVE_POINTS).round().astype(int))
            recall, precision, scores = recall[keep], precision[keep], scores[keep]
        ap = metrics[ap_key].get(name)
        fig.add_trace(go.Scatter(
            x=recall, y=precision, customdata=scores, mode="lines", name=f"{name} ({percent(ap)[0]})",
            hovertemplate=f"<b>{name}</b><br>recall %{{x:.3f}}<br>precision %{{y:.3f}}<br>"
                          "score threshold %{customdata:.3f}<extra></extra>"))
    fig.update_layout(xaxis={"title": "recall", "range": [0, 1.01]}, yaxis={"title": "precision", "range": [0, 1.02]},
                      height=480, margin={"t": 30}, legend_title_text=f"class ({ap_key.removesuffix('_per_class')})")
    coco = isinstance(evaluator, CocoEvaluator)
    text = ["Precision against recall at IoU 0.5, one curve per class with ground truth (legend: its AP50, %). "
            + ("COCOeval's interpolated curve at 101 recall points (100 detections per image); "
               if coco else "Down the ranked detections (the VOC evaluator's curve); ")
            + "hover for the score threshold that reaches each point; click a legend entry to hide a class."]
    return Section("pr", "Precision-recall curves", text=text, figures=[figure_html(fig, "pr-curves")])


def confusion_matrix(coco_gt: dict, detections: Sequence[dict]) -> tuple[np.ndarray, list[str]]:
    """[K+1, K+1] counts: rows the ground-truth class or "no object", columns the predicted class or "missed".
    Matching is faster-coco-eval's (`match`, use_cats=False: each detection scoring >= SCORE_THRESH, highest
    score first, takes the unmatched object of highest IoU >= IOU_THRESH, whatever its class); the tally is here,
    since ExtraEval's own matrix counts crowd regions as missed and files false positives under their predicted
    class's row."""
    categories = sorted(coco_gt["categories"], key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(categories)}
    k = len(categories)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    matched = match(coco_gt, detections, use_cats=False)
    gt_to_dt = {g: d for d, g in matched.dt_to_gt.items()}
    for gt_id, ann in matched.gt.items():
        if not _ignored(ann):
            dt_id = gt_to_dt.get(gt_id)
            matrix[index[ann["category_id"]], k if dt_id is None else index[matched.dt[dt_id]["category_id"]]] += 1
    for dt_id, ann in matched.dt.items():
        if dt_id not in matched.dt_to_gt:
            matrix[k, index[ann["category_id"]]] += 1
    return matrix, [str(c["name"]) for c in categories]


def _confusion(coco_gt: dict, detections: Sequence[dict]) -> Section:
    matrix, names = confusion_matrix(coco_gt, detections)
    rows_labels, column_labels = [*names, "no object"], [*names, "missed"]
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    annotate = len(names) <= MAX_ANNOTATED_CLASSES
    fig = go.Figure(go.Heatmap(
        z=share, x=column_labels, y=rows_labels, text=matrix if annotate else None,
        texttemplate="%{text}" if annotate else None, colorscale="Blues",
        zmin=0, zmax=1, customdata=matrix, colorbar={"title": "share of row"},
        hovertemplate="ground truth %{y}<br>predicted %{x}<br>%{customdata} (%{z:.0%} of the row)<extra></extra>"))
    size = max(360, min(1200, 60 * len(column_labels) + 200))
    fig.update_layout(xaxis={"title": "predicted class (or missed)", "side": "top"},
                      yaxis={"title": "ground truth (or no object)", "autorange": "reversed"},
                      height=size, width=size + 100, margin={"t": 90})
    correct = int(np.trace(matrix[:-1, :-1]))
    text = [f"Detections with score >= {SCORE_THRESH} matched to ground truth at IoU >= {IOU_THRESH} regardless of "
            "class (faster-coco-eval's matching, highest score first). Row \"no object\": detections on background; "
            f"column \"missed\": objects no detection matched. Colour: share of the row. {correct} of "
            f"{int(matrix[:-1].sum())} objects found with the right class; {int(matrix[-1].sum())} detections on "
            "background."]
    table = Table("confusion-table", ["ground truth \\ predicted", *column_labels],
                  [[rows_labels[i], *[(str(v), int(v)) for v in matrix[i]]] for i in range(len(rows_labels))])
    return Section("confusion", "Confusion matrix", text=text, figures=[figure_html(fig, "confusion-matrix")],
                   tables=[table] if annotate else [])


def _errors(breakdown: ErrorBreakdown) -> Section:
    names = [*ERROR_TYPES, *SPECIAL_TYPES]
    gains = [100 * breakdown.delta[name] for name in names]
    fig = go.Figure(go.Bar(
        x=gains, y=names, orientation="h", text=[f"{g:.1f}" for g in gains], textposition="outside",
        marker_color=["#d62728"] * len(ERROR_TYPES) + ["#7f7f7f"] * len(SPECIAL_TYPES),
        hovertemplate="%{y}: +%{x:.2f} AP50 if fixed<extra></extra>"))
    fig.update_layout(xaxis_title="AP50 points gained if fixed", yaxis={"autorange": "reversed"}, height=380,
                      margin={"t": 30, "l": 120})
    overall = Table("error-table", ("error", "count", "AP50 gained"), [
        [name, (str(breakdown.counts[name]), breakdown.counts[name]) if name in breakdown.counts else "",
         (f"{100 * breakdown.delta[name]:.1f}", breakdown.delta[name])] for name in names])
    per_class = Table("error-class-table", ("class", "AP50", *names), [
        [cls, percent(breakdown.ap_per_class[cls]),
         *[("n/a", -math.inf) if math.isnan(gain[name]) else (f"{100 * gain[name]:.1f}", gain[name]) for name in names]]
        for cls, gain in breakdown.delta_per_class.items()], caption="AP50 points gained per class if fixed")
    text = [f"TIDE's error types (Bolya et al. 2020) at IoU {breakdown.pos_thresh} (background below IoU "
            f"{breakdown.bg_thresh}), over all detections: classification (right box, wrong class), localisation "
            "(right class, IoU 0.1-0.5), both, duplicate (the object was already matched), background (no object "
            "near), missed (no detection at all). Each bar is the AP50 gained by fixing only that type; the grey "
            "ones fix every false positive / every false negative at once (perfect precision / recall).",
            f"Baseline AP50 of this analysis: {100 * breakdown.ap:.1f} (COCO's 101-point AP50; with eval.metric=coco "
            "on the evaluator's ground truth it is metrics.json's AP50)."]
    return Section("errors", "Error breakdown", text=text, figures=[figure_html(fig, "error-breakdown")],
                   tables=[overall, per_class])


@lru_cache(maxsize=1)
def _font() -> str:
    """A TrueType font for the labels: matplotlib's DejaVu Sans (torchvision's default bitmap font is tiny)."""
    from matplotlib import font_manager

    return font_manager.findfont("DejaVu Sans")


def draw_boxes(image: np.ndarray, boxes: np.ndarray, labels: Sequence[str], colours: Sequence[str]) -> np.ndarray:
    """RGB uint8 [H, W, 3] with labelled xyxy boxes, line width and font scaled to the image; an image smaller
    than MIN_DRAWN_SIDE is enlarged by a whole factor first (each pixel a block, nothing smoothed)."""
    scale = max(1, math.ceil(MIN_DRAWN_SIDE / max(image.shape[:2])))
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if len(boxes):
        side = max(image.shape[:2])
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) * scale
        tensor = draw_bounding_boxes(tensor, boxes, labels=list(labels), colors=list(colours),
                                     width=max(2, side // 250), font=_font(), font_size=max(11, side // 45),
                                     fill_labels=True, label_colors="white")
    return tensor.permute(1, 2, 0).numpy()


def _gallery(out_dir: Path, coco_gt: dict, detections: Sequence[dict], records: Sequence[ImageRecord],
             size: int) -> Section:
    """The `size` images with the most false positives + missed objects at the page's thresholds, drawn."""
    matched = match(coco_gt, detections, use_cats=True)
    name_of = {c["id"]: str(c["name"]) for c in coco_gt["categories"]}
    per_image: dict[int, dict[str, list]] = defaultdict(lambda: {"tp": [], "fp": [], "fn": []})
    for dt_id, ann in matched.dt.items():
        per_image[ann["image_id"]]["tp" if dt_id in matched.dt_to_gt else "fp"].append(ann)
    taken = set(matched.dt_to_gt.values())
    for gt_id, ann in matched.gt.items():
        if gt_id not in taken and not _ignored(ann):
            per_image[ann["image_id"]]["fn"].append(ann)
    tp_on_crowd = {d for d, g in matched.dt_to_gt.items() if _ignored(matched.gt[g])}
    errors = {image_id: len(v["fp"]) + len(v["fn"]) for image_id, v in per_image.items()}
    worst = sorted((i for i in errors if errors[i] > 0), key=lambda i: (-errors[i], i))[:size]
    by_id = {r.image_id: r for r in records}
    items = []
    for image_id in worst:
        record, found = by_id.get(image_id), per_image[image_id]
        if record is None:
            continue
        boxes, labels, colours = [], [], []
        for kind, anns, colour in (("missed", found["fn"], COLOURS["missed"]),
                                   ("tp", found["tp"], COLOURS["true positive"]),
                                   ("fp", found["fp"], COLOURS["false positive"])):
            for ann in anns:
                boxes.append(ann["bbox"])
                score = f" {ann['score']:.2f}" if "score" in ann else ""
                crowd = " (crowd)" if ann["id"] in tp_on_crowd and kind == "tp" else ""
                labels.append(f"{name_of[ann['category_id']]}{score}{crowd}" + (" missed" if kind == "missed" else ""))
                colours.append(colour)
        xyxy = box_convert(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy").numpy()
        drawn = draw_boxes(read_image(record.path), xyxy, labels, colours)
        full, thumb = save_gallery_image(out_dir, f"{image_id}", drawn)
        items.append(GalleryItem(full, thumb, Path(record.path).name, [
            f"{len(found['fp'])} false positive(s), {len(found['fn'])} missed, {len(found['tp'])} found"]))
    legend = [(COLOURS["true positive"], "true positive (class score)"),
              (COLOURS["false positive"], "false positive (class score)"),
              (COLOURS["missed"], "missed object (ground truth)")]
    text = [f"The {len(items)} images with the most errors at score >= {SCORE_THRESH}, IoU >= {IOU_THRESH} (matching "
            "per class by faster-coco-eval: a right box with the wrong class shows as a false positive and a missed "
            "object); the count is false positives + missed objects. Click a thumbnail for the full-size drawing."
            + ("" if items else " No image has an error at this threshold.")]
    return Section("gallery", "Images with the most errors", text=text, gallery=items, legend=legend)


def write_detection_browse(out_dir: str | Path, *, cfg: DictConfig, split: str, num: int,
                           config_path: str | Path | None = None) -> Path:
    """The first `num` images of `split` as the model sees them: after the run's transforms (training: resize
    to one of data.min_size and flip, each image drawn with the augmentation epoch 0 of a run with train.seed
    gives it; val: the test resize), with their boxes and class names; plus the split's class counts and the
    drawn boxes' sizes, to catch a wrong class list, swapped coordinates or a broken augmentation early."""
    out_dir = prepare_report_dir(out_dir)
    records, class_names, _ = load_split(cfg.data, split)
    dataset = SeededDataset(build_dataset(cfg.data, records, train=split == "train"))
    items, drawn_counts, sides = [], Counter(), []
    for index in range(min(num, len(records))):
        image, target = dataset[(index, sample_seed(cfg.train.seed, 0, index))]
        record = records[index]
        pixels = image.mul(255).round().byte().permute(1, 2, 0).numpy()
        names = [class_names[int(label) - 1] for label in target["labels"]]
        drawn_counts.update(names)
        boxes = target["boxes"].numpy()
        sides += np.sqrt(np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)).tolist()
        colours = [CLASS_COLOURS[(int(label) - 1) % len(CLASS_COLOURS)] for label in target["labels"]]
        drawn = draw_boxes(pixels, boxes, names, colours)
        full, thumb = save_gallery_image(out_dir, f"{index}", drawn)
        kept = int((~record.ignore).sum())
        lines = [f"{record.width}x{record.height} -> {pixels.shape[1]}x{pixels.shape[0]} px, objects: {len(names)}"
                 + (f" ({kept - len(names)} dropped by the transform)" if kept != len(names) else "")]
        if record.ignore.any():
            lines.append(f"{int(record.ignore.sum())} crowd / difficult (not drawn: not training targets)")
        items.append(GalleryItem(full, thumb, Path(record.path).name, lines))

    in_split = Counter(class_names[int(label) - 1] for r in records for label in r.labels[~r.ignore])
    images_with = Counter(class_names[int(label) - 1] for r in records for label in np.unique(r.labels[~r.ignore]))
    table = Table("class-table", ("class", "label", "objects in the split", "images with it", "objects drawn"), [
        [name, (str(k), k), (str(in_split[name]), in_split[name]), (str(images_with[name]), images_with[name]),
         (str(drawn_counts[name]), drawn_counts[name])] for k, name in enumerate(class_names, start=1)])
    bars = go.Figure(go.Bar(x=class_names, y=[in_split[name] for name in class_names],
                            hovertemplate="%{x}: %{y} objects<extra></extra>"))
    bars.update_layout(title=f"objects per class in the {split} split", yaxis_title="objects", height=360,
                       margin={"t": 50})
    sizes = go.Figure(go.Histogram(x=sides, nbinsx=30, hovertemplate="%{x} px: %{y} boxes<extra></extra>"))
    sizes.update_layout(title="box size after the transforms (square root of the area, pixels), drawn images",
                        xaxis_title="sqrt(box area), px", yaxis_title="boxes", height=360, margin={"t": 50})
    empty = sum(1 for r in records if not (~r.ignore).any())
    text = [f"{len(records)} images in the {split} split ({empty} without objects), {len(class_names)} classes "
            f"(model.num_classes={cfg.model.num_classes}). Label k is the model's class index."]
    sections = [
        Section("classes", "Classes", text=text, tables=[table], figures=[figure_html(bars, "class-counts"),
                                                                          figure_html(sizes, "box-sizes")]),
        Section("samples", "Samples after the transforms", gallery=items,
                legend=[(CLASS_COLOURS[k % len(CLASS_COLOURS)], name) for k, name in enumerate(class_names)],
                text=[f"The first {len(items)} images of the split after the {split} transforms"
                      + (f" (drawn with epoch 0's augmentation of train.seed={cfg.train.seed})" if split == "train"
                         else "") + ". Click a thumbnail for full size."]),
    ]
    data = f"{cfg.data.format} {split} split"
    rows = provenance(cfg, checkpoint="(none: data only)", data=data, images=len(records), config_path=config_path)
    return write_page(out_dir, title=f"Detection data: {split} split", subtitle=f"{len(items)} samples as the model "
                      "sees them", sections=sections, provenance_rows=rows, config_text=OmegaConf.to_yaml(cfg))
