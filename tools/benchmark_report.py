"""How long the detection evaluation page takes at COCO's size: 5,000 val images x 100 detections each, 80
classes, ~7.3 objects an image (COCO val2017's mean), beyond the evaluation itself.

    python tools/benchmark_report.py --out docs/benchmark_report.json

The ground truth and detections are generated (seeded): each object gets a few jittered detections, some with
another class, the rest of its image's 100 are boxes scattered on background, scores uniform so that ~20 % pass
the page's 0.5 threshold. Every record points at one 640x480 JPEG, so only decoding the gallery's images costs
what it would on COCO. Timed: the COCO evaluation (CocoEvaluator.compute, what training does anyway) and then
`write_detection_report` (error breakdown, confusion matrix, gallery matching and drawing, plotly, page); the
parts are also timed alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detection.build import DEFAULT_CONFIG  # noqa: E402
from detection.datasets import ImageRecord  # noqa: E402
from detection.error_analysis import analyze_errors  # noqa: E402
from detection.evaluation import CocoEvaluator  # noqa: E402
from detection.report import confusion_matrix, write_detection_report  # noqa: E402
from engine.config import load_config  # noqa: E402
from experiments.benchmarking import cpu_model, timed  # noqa: E402

WIDTH, HEIGHT = 640, 480


def generate(images: int, detections: int, classes: int, seed: int) -> tuple[dict, list[dict]]:
    """COCO ground truth and `detections` results per image (see the module docstring)."""
    rng = np.random.default_rng(seed)
    coco_images, annotations, results = [], [], []
    for image_id in range(1, images + 1):
        coco_images.append({"id": image_id, "file_name": "image.jpg", "width": WIDTH, "height": HEIGHT})
        count = int(rng.poisson(7.3))
        sizes = np.exp(rng.uniform(np.log(8), np.log(400), (count, 2)))  # small, medium and large objects
        xy = rng.uniform(0, 1, (count, 2)) * np.maximum([WIDTH, HEIGHT] - sizes, 1)
        labels = rng.integers(1, classes + 1, count)
        for box, label in zip(np.concatenate([xy, sizes], axis=1).tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(rng.random() < 0.01)})
        near = rng.integers(0, count, min(detections // 2, 3 * count)) if count else np.zeros(0, dtype=int)
        jitter = rng.normal(0, 0.15, (len(near), 4)) * np.tile(sizes[near], 2) if count else np.zeros((0, 4))
        boxes = np.concatenate([xy[near], sizes[near]], axis=1) + jitter if count else np.zeros((0, 4))
        det_labels = np.where(rng.random(len(near)) < 0.85, labels[near], rng.integers(1, classes + 1, len(near)))
        far = detections - len(near)
        far_sizes = np.exp(rng.uniform(np.log(8), np.log(300), (far, 2)))
        far_boxes = np.concatenate([rng.uniform(0, 1, (far, 2)) * ([WIDTH, HEIGHT] - far_sizes), far_sizes], axis=1)
        boxes = np.concatenate([boxes, far_boxes])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        det_labels = np.concatenate([det_labels, rng.integers(1, classes + 1, far)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(near)), rng.uniform(0.05, 0.6, far)])
        for box, label, score in zip(boxes.tolist(), det_labels.tolist(), scores.tolist()):
            results.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
    categories = [{"id": k, "name": f"class{k:02d}"} for k in range(1, classes + 1)]
    return {"images": coco_images, "annotations": annotations, "categories": categories}, results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--gallery", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the drawing)")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    coco_gt, detections = generate(args.images, args.detections, args.classes, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(
            tmp / "image.jpg", quality=90)
        records = [ImageRecord(str(tmp / "image.jpg"), WIDTH, HEIGHT, np.zeros((0, 4), np.float32),
                               np.zeros(0, np.int64), np.zeros(0, bool), image["id"]) for image in coco_gt["images"]]
        cfg = load_config(DEFAULT_CONFIG, overrides=[f"model.num_classes={args.classes}", "data.format=coco"])
        evaluator = CocoEvaluator(coco_gt, list(range(1, args.classes + 1)))
        evaluator.extend(detections)
        metrics, evaluation_s = timed(evaluator.compute)
        page, report_s = timed(lambda: write_detection_report(tmp / "report", cfg=cfg, metrics=metrics,
                                                              evaluator=evaluator, records=records,
                                                              gallery_size=args.gallery))
        size_mb = sum(f.stat().st_size for f in (tmp / "report").rglob("*") if f.is_file()) / 1e6
        _, breakdown_s = timed(lambda: analyze_errors(coco_gt, detections))
        _, confusion_s = timed(lambda: confusion_matrix(coco_gt, detections))

    load = os.getloadavg()
    result = {
        "images": args.images, "detections": len(detections), "objects": len(coco_gt["annotations"]),
        "classes": args.classes, "gallery": args.gallery, "AP50": metrics["AP50"],
        "evaluation_s": round(evaluation_s, 1), "report_s": round(report_s, 1),
        "parts_alone_s": {"error_breakdown": round(breakdown_s, 1), "confusion_matrix": round(confusion_s, 1)},
        "report_mb": round(size_mb, 1), "cpu": _cpu(), "torch_threads": args.threads,
        "load_average": [round(v, 2) for v in load], "python": platform.python_version(),
    }
    print(f"{args.images} images x {args.detections} detections ({len(coco_gt['annotations'])} objects, "
          f"{args.classes} classes): evaluation {evaluation_s:.1f} s, report {report_s:.1f} s "
          f"(error breakdown alone {breakdown_s:.1f} s, confusion matrix alone {confusion_s:.1f} s), "
          f"{size_mb:.1f} MB; load average {load[0]:.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cpu() -> str:
    model = cpu_model()
    return f"{model} ({os.cpu_count()} logical CPUs)" if model else platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
