"""The segmentation evaluation page (engine.report): headline metrics, per-class IoU and accuracy, the pixel
confusion matrix as a heatmap, the images with the lowest mIoU with ground-truth and prediction overlays, the
training curves; and the page of training / val samples after the transforms.

The numbers are the evaluator's (its summed confusion matrix, so they equal metrics.json); the gallery re-runs
the model on its few images only (the evaluation keeps each image's mIoU, not its prediction). Charts are plotly;
overlays use the VOC palette of segmentation.palette.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datafiles.images import image_to_tensor
from engine.random_state import sample_seed
from engine.report import (GalleryItem, Section, Table, figure_html, history_section, percent, prepare_report_dir,
                           provenance, save_gallery_image, write_page)
from engine.sampling import SeededDataset

from .build import build_dataset
from .datasets import SegmentationDataset
from .evaluation import SegmentationEvaluator, multiscale_flip_inference
from .palette import VOID, colorize, overlay
from .transforms import build_seg_transforms

MAX_ANNOTATED_CLASSES = 25  # heatmap cells carry their percentage up to this many classes (unreadable beyond)


def write_segmentation_report(out_dir: str | Path, *, cfg: DictConfig, metrics: dict[str, Any],
                              evaluator: SegmentationEvaluator, model: nn.Module, dataset: SegmentationDataset,
                              device: torch.device, run_dir: str | Path | None = None,
                              checkpoint: str | Path | None = None, config_path: str | Path | None = None,
                              gallery_size: int = 24, amp_dtype: torch.dtype | None = None,
                              title: str = "Segmentation evaluation") -> Path:
    """The page for one evaluation into `out_dir` (replacing an earlier report there): `evaluator` produced
    `metrics` over the first images of `dataset` (full resolution, as evaluated), `model` is the model it
    evaluated (run again on the gallery's images). Returns the path of index.html."""
    out_dir = prepare_report_dir(out_dir)
    names = evaluator.class_names
    confusion = evaluator.confusion.numpy()
    sections = [_headline(metrics, len(evaluator.image_miou)),
                _per_class(metrics, names, confusion),
                _confusion(confusion, names),
                _gallery(out_dir, evaluator.image_miou, model, dataset, device, gallery_size, cfg, amp_dtype)]
    curves = history_section(run_dir)
    if curves is not None:
        sections.append(curves)
    data = f"{cfg.data.format} val split ({cfg.data.root if cfg.data.format == 'voc' else cfg.data.val.annotations})"
    rows = provenance(cfg, checkpoint=checkpoint, data=data, images=len(evaluator.image_miou),
                      config_path=config_path)
    subtitle = (f"mIoU {percent(metrics['mIoU'])[0]} % on {len(evaluator.image_miou)} val images, "
                f"{len(names)} classes")
    return write_page(out_dir, title=title, subtitle=subtitle, sections=sections, provenance_rows=rows,
                      config_text=OmegaConf.to_yaml(cfg))


def palette_legend(names: Sequence[str]) -> list[tuple[str, str]]:
    """(CSS colour, class name) of each class in the VOC palette."""
    colours = colorize(np.arange(len(names)))
    return [(f"rgb({r}, {g}, {b})", name) for (r, g, b), name in zip(colours.tolist(), names)]


def _headline(metrics: dict, images: int) -> Section:
    rows = [["mIoU", percent(metrics["mIoU"])], ["pixel accuracy", percent(metrics["pixel_acc"])],
            ["mean class accuracy", percent(metrics["mean_acc"])]]
    text = [f"Over {images} val images at full resolution (eval.scales / eval.flip as configured), in percent, as in "
            "metrics.json (mIoU, pixel_acc, mean_acc); void pixels are not scored."]
    return Section("summary", "Headline metrics", text=text, tables=[Table("headline-table", ("metric", "%"), rows)])


def _per_class(metrics: dict, names: Sequence[str], confusion: np.ndarray) -> Section:
    iou, accuracy = metrics["IoU_per_class"], metrics.get("acc_per_class", {})
    gt_pixels, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    rows = [[name, (f"{int(gt_pixels[k]):,}", int(gt_pixels[k])), (f"{int(predicted[k]):,}", int(predicted[k])),
             percent(iou.get(name)), percent(accuracy.get(name))] for k, name in enumerate(names)]
    text = ["IoU and accuracy (the share of the class's pixels predicted as it) per class, in percent, as in "
            "metrics.json (IoU_per_class, acc_per_class); n/a: the class is in neither the ground truth nor the "
            "predictions (IoU) or not in the ground truth (accuracy). Click a header to sort."]
    return Section("classes", "Per class", text=text, tables=[
        Table("per-class-table", ("class", "pixels", "predicted pixels", "IoU", "accuracy"), rows)])


def _confusion(confusion: np.ndarray, names: Sequence[str]) -> Section:
    totals = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    annotate = len(names) <= MAX_ANNOTATED_CLASSES
    fig = go.Figure(go.Heatmap(
        z=share, x=list(names), y=list(names), colorscale="Blues", zmin=0, zmax=1, customdata=confusion,
        text=np.vectorize(lambda v: f"{100 * v:.0f}")(share) if annotate else None,
        texttemplate="%{text}" if annotate else None, colorbar={"title": "share of row"},
        hovertemplate="ground truth %{y}<br>predicted %{x}<br>%{customdata:,} pixels (%{z:.1%} of the row)"
                      "<extra></extra>"))
    size = max(380, min(1200, 40 * len(names) + 220))
    fig.update_layout(xaxis={"title": "predicted class", "side": "top"},
                      yaxis={"title": "ground-truth class", "autorange": "reversed"},
                      height=size, width=size + 100, margin={"t": 90})
    text = ["Pixels of each ground-truth class (rows) by predicted class (columns), coloured and labelled by the share "
            "of the row in percent (the diagonal is the class accuracy); hover for pixel counts."]
    return Section("confusion", "Confusion matrix", text=text, figures=[figure_html(fig, "confusion-matrix")])


@torch.no_grad()
def _gallery(out_dir: Path, image_miou: dict[int, float], model: nn.Module, dataset: SegmentationDataset,
             device: torch.device, size: int, cfg: DictConfig, amp_dtype: torch.dtype | None) -> Section:
    """The `size` images with the lowest mIoU: image | ground truth | prediction, side by side."""
    ranked = sorted((i for i in image_miou if not np.isnan(image_miou[i])), key=lambda i: (image_miou[i], i))[:size]
    model.eval()
    items = []
    for index in ranked:
        image, mask = dataset.load_sample(index)
        tensor = image_to_tensor(image)[None].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            log_probs = multiscale_flip_inference(model, tensor, tuple(cfg.eval.scales), cfg.eval.flip)
        prediction = log_probs.argmax(1)[0].cpu().numpy()
        gap = np.full((image.shape[0], max(4, image.shape[1] // 100), 3), 255, dtype=np.uint8)
        panels = np.concatenate([image, gap, overlay(image, mask), gap, overlay(image, prediction)], axis=1)
        full, thumb = save_gallery_image(out_dir, f"{index}", panels)
        path = Path(dataset.samples[index][0])
        present = ", ".join(dataset.class_names[c] for c in np.unique(mask) if c != VOID)
        items.append(GalleryItem(full, thumb, path.name, [f"mIoU {100 * image_miou[index]:.1f} %",
                                                          f"ground truth: {present or 'void only'}"]))
    text = [f"The {len(items)} val images with the lowest mIoU (over the classes in the image's ground truth or "
            "prediction), each as image | ground truth | prediction, classes in the VOC palette (void: image shows "
            "through). Click a thumbnail for full size."]
    return Section("gallery", "Images with the lowest mIoU", text=text, gallery=items,
                   legend=palette_legend(dataset.class_names))


def write_segmentation_browse(out_dir: str | Path, *, cfg: DictConfig, split: str, num: int,
                              config_path: str | Path | None = None) -> Path:
    """The first `num` samples of `split` as the model sees them: after the run's transforms (training: random
    scale, pad, crop and flip, each drawn with the augmentation epoch 0 of a run with train.seed gives it; val: full
    resolution), as image | overlay | mask in the palette (void in cream), with the pixel count per class."""
    out_dir = prepare_report_dir(out_dir)
    transform = None
    if split == "train":  # the training transform exactly as tools/train_seg.py builds it
        transform = build_seg_transforms(True, cfg.data.crop_size, scale_range=tuple(cfg.data.scale_range),
                                         flip_prob=cfg.data.flip_prob)
    dataset = build_dataset(cfg.data, split, transform)
    seeded = SeededDataset(dataset)
    names = dataset.class_names
    pixels, images_with, items = np.zeros(len(names) + 1, dtype=np.int64), Counter(), []
    for index in range(min(num, len(dataset))):
        image, mask = seeded[(index, sample_seed(cfg.train.seed, 0, index))]
        rgb = image.mul(255).round().byte().permute(1, 2, 0).numpy()
        labels = mask.numpy().astype(np.int64)
        counts = np.bincount(np.where(labels == VOID, len(names), labels).ravel(), minlength=len(names) + 1)
        pixels += counts
        images_with.update(names[c] for c in np.flatnonzero(counts[:-1]))
        gap = np.full((rgb.shape[0], max(4, rgb.shape[1] // 100), 3), 255, dtype=np.uint8)
        panels = np.concatenate([rgb, gap, overlay(rgb, labels), gap, colorize(labels)], axis=1)
        full, thumb = save_gallery_image(out_dir, f"{index}", panels)
        present = ", ".join(names[c] for c in np.flatnonzero(counts[:-1]))
        items.append(GalleryItem(full, thumb, Path(dataset.samples[index][0]).name, [
            f"{rgb.shape[1]}x{rgb.shape[0]} px after the transforms, {100 * counts[-1] / labels.size:.0f} % void",
            f"classes: {present or 'none'}"]))
    scored = pixels[:-1].sum()
    table = Table("class-table", ("class", "index", "pixels", "share of scored pixels", "images with it"), [
        [name, (str(k), k), (f"{int(pixels[k]):,}", int(pixels[k])),
         (f"{100 * pixels[k] / scored:.1f}" if scored else "n/a", pixels[k] / scored if scored else -1.0),
         (str(images_with[name]), images_with[name])] for k, name in enumerate(names)])
    bars = go.Figure(go.Bar(x=list(names), y=pixels[:-1].tolist(), marker_color=[c for c, _ in palette_legend(names)],
                            hovertemplate="%{x}: %{y:,} pixels<extra></extra>"))
    bars.update_layout(title=f"pixels per class in the {len(items)} drawn samples", yaxis_title="pixels", height=360,
                       margin={"t": 50})
    text = [f"{len(dataset)} images in the {split} split, {len(names)} classes (model.num_classes="
            f"{cfg.model.num_classes}); void pixels ({int(pixels[-1]):,} here) are neither trained on nor scored."]
    sections = [
        Section("classes", "Classes", text=text, tables=[table], figures=[figure_html(bars, "class-counts")]),
        Section("samples", "Samples after the transforms", gallery=items, legend=palette_legend(names),
                text=[f"The first {len(items)} samples of the split after the {split} transforms"
                      + (f" (drawn with epoch 0's augmentation of train.seed={cfg.train.seed})" if split == "train"
                         else " (full resolution, as evaluated)")
                      + ", as image | overlay | mask (void in cream). Click a thumbnail for full size."]),
    ]
    rows = provenance(cfg, checkpoint="(none: data only)", data=f"{cfg.data.format} {split} split",
                      images=len(dataset), config_path=config_path)
    return write_page(out_dir, title=f"Segmentation data: {split} split", subtitle=f"{len(items)} samples as the "
                      "model sees them", sections=sections, provenance_rows=rows, config_text=OmegaConf.to_yaml(cfg))
