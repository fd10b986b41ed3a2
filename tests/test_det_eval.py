"""Box evaluators: COCO stats identical to running pycocotools by hand, VOC AP against a brute-force reference."""
import contextlib
import io
import json
from dataclasses import replace
import logging
import math
import pickle

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.datasets import ImageRecord, load_coco_records
from detection.evaluation import (COCO_STATS, CocoEvaluator, VOCEvaluator, format_per_class_table, records_to_coco,
                                  voc_ap)
from detection.synthetic import generate_shapes_dataset

BACKENDS = ["faster_coco_eval", "pycocotools"]


def noisy_detections(records: list[ImageRecord], num_classes: int, seed: int) -> list[tuple]:
    """(image_id, boxes xyxy, scores, labels) per image: jittered ground truth, duplicates, wrong labels and
    background false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        boxes, labels = [], []
        for box, label in zip(r.boxes, r.labels):
            for _ in range(rng.choice([0, 1, 1, 1, 2])):  # missed, found, or found twice
                boxes.append(box + rng.normal(0, 0.06 * (box[2] - box[0]), 4))
                labels.append(label if rng.random() < 0.85 else rng.integers(1, num_classes + 1))
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, r.width - 10), rng.uniform(0, r.height - 10)
            boxes.append([x, y, x + rng.uniform(4, 30), y + rng.uniform(4, 30)])
            labels.append(rng.integers(1, num_classes + 1))
        out.append((r.image_id, np.array(boxes, np.float64).reshape(-1, 4), rng.random(len(boxes)),
                    np.array(labels, np.int64)))
    return out


# ---------------------------------------------------------------- COCO

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=0, num_val=30, image_size=96)
    records, names, cat_ids = load_coco_records(root / "val", root / "annotations" / "instances_val.json")
    records = [replace(r, ignore=np.arange(len(r.ignore)) == 0) if i % 4 == 0 else r  # some crowd regions
               for i, r in enumerate(records)]
    return records, names, cat_ids


def pycocotools_by_hand(gt: dict, detections: list[dict], tmp_path) -> list[float]:
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_coco_evaluator_matches_pycocotools(shapes, backend, tmp_path, caplog):
    records, names, cat_ids = shapes
    gt = records_to_coco(records, names, cat_ids)
    evaluator = CocoEvaluator(gt, cat_ids, backend=backend)
    reference_dets = []
    for image_id, boxes, scores, labels in noisy_detections(records, len(names), seed=1):
        evaluator.update(image_id, boxes, scores, labels)
        reference_dets += [{"image_id": image_id, "category_id": cat_ids[label - 1], "score": score,
                            "bbox": [x1, y1, x2 - x1, y2 - y1]}
                           for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())]
    expected = pycocotools_by_hand(gt, reference_dets, tmp_path)

    shard = pickle.loads(pickle.dumps(evaluator.predictions))  # as if all-gathered from another rank
    merged = CocoEvaluator(tmp_path / "gt.json", cat_ids, backend=backend)
    merged.extend(shard + [{"image_id": 10**6, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}])
    with caplog.at_level(logging.WARNING, logger="detection.evaluation"):
        stats = merged.compute()
    assert "dropped 1 predictions" in caplog.text

    assert list(stats) == [*COCO_STATS, "AP_per_class", "AP50_per_class", "AR_per_class"]
    np.testing.assert_allclose([stats[k] for k in COCO_STATS], expected, rtol=0, atol=1e-12)
    assert list(stats["AP_per_class"]) == names  # and COCO AP is the mean of the classes' APs
    assert np.mean(list(stats["AP_per_class"].values())) == pytest.approx(stats["AP"], abs=1e-12)
    assert np.mean(list(stats["AR_per_class"].values())) == pytest.approx(stats["AR100"], abs=1e-12)
    assert 0.2 < stats["AP"] < 0.95 and stats["APl"] == -1  # non-trivial; no large objects in 96 px images
    assert evaluator.compute() == stats


def test_coco_zero_predictions(shapes):
    records, names, cat_ids = shapes
    gt = records_to_coco(records, names, cat_ids)
    results = [CocoEvaluator(gt, cat_ids, backend=b).compute() for b in BACKENDS]
    assert results[0] == results[1]
    assert all(results[0][k] == 0.0 for k in COCO_STATS if k not in ("APl", "ARl"))
    assert set(results[0]["AP_per_class"].values()) == {0.0}
    assert results[0]["APl"] == results[0]["ARl"] == -1


def test_coco_evaluator_rejects_bad_arguments():
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    with pytest.raises(ValueError, match="faster_coco_eval.*pycocotools"):
        CocoEvaluator(gt, [1], backend="detectron2")
    with pytest.raises(ValueError, match="image id 3: labels \\[2\\]"):
        CocoEvaluator(gt, [1]).update(3, np.zeros((1, 4)), np.ones(1), np.array([2]))


def test_records_to_coco_layout():
    record = ImageRecord("a/b.jpg", 40, 30, np.array([[1, 2, 11, 7]], np.float32), np.array([2]), np.array([True]), 7)
    gt = records_to_coco([record], ["x", "y"], [10, 20])
    assert gt["images"] == [{"id": 7, "file_name": "b.jpg", "width": 40, "height": 30}]
    assert gt["annotations"] == [{"id": 1, "image_id": 7, "category_id": 20, "bbox": [1, 2, 10, 5], "area": 50,
                                  "iscrowd": 1}]
    assert gt["categories"] == [{"id": 10, "name": "x"}, {"id": 20, "name": "y"}]


# ---------------------------------------------------------------- VOC

def record(image_id, boxes, labels, difficult, size=(100, 80)) -> ImageRecord:
    return ImageRecord(f"{image_id}.jpg", size[0], size[1], np.array(boxes, np.float32).reshape(-1, 4),
                       np.array(labels, np.int64), np.array(difficult, bool), image_id)


def brute_force_voc(records, predictions, num_classes, use_07_metric):
    """The devkit's rules written out loop by loop, with AP as sum of recall steps times the best precision at
    or beyond each rank (2010+) or the 11-point mean (07)."""
    aps = []
    for label in range(1, num_classes + 1):
        gts = [(r.image_id, box, hard) for r in records
               for box, lab, hard in zip(r.boxes.tolist(), r.labels.tolist(), r.ignore.tolist()) if lab == label]
        positives = sum(not hard for _, _, hard in gts)
        used, hits = set(), []
        for image_id, _, _, box in sorted((p for p in predictions if p[1] == label), key=lambda p: -p[2]):
            best_iou, best = 0.0, None
            for index, (gt_image, gt_box, _) in enumerate(gts):
                if gt_image != image_id:
                    continue
                iw = max(0.0, min(box[2], gt_box[2]) - max(box[0], gt_box[0]))
                ih = max(0.0, min(box[3], gt_box[3]) - max(box[1], gt_box[1]))
                union = (box[2] - box[0]) * (box[3] - box[1]) + (gt_box[2] - gt_box[0]) * (gt_box[3] - gt_box[1])
                iou = iw * ih / (union - iw * ih)
                if iou > best_iou:
                    best_iou, best = iou, index
            if best is None or best_iou < 0.5:
                hits.append(False)
            elif gts[best][2]:
                continue
            elif best in used:
                hits.append(False)
            else:
                used.add(best)
                hits.append(True)
        if positives == 0:
            aps.append(math.nan)
            continue
        tp = np.cumsum(hits)
        precision = [tp[i] / (i + 1) for i in range(len(hits))]
        recall = [tp[i] / positives for i in range(len(hits))]
        if use_07_metric:
            best = [max([p for p, r in zip(precision, recall) if r >= t / 10], default=0) for t in range(11)]
            aps.append(sum(best) / 11)
        else:
            aps.append(sum((recall[i] - (recall[i - 1] if i else 0)) * max(precision[i:]) for i in range(len(hits))))
    return aps


@pytest.fixture(scope="module")
def voc_case():
    """4 classes: 1-2 normal, 3 only difficult ground truth, 4 no ground truth at all (both must give nan)."""
    rng = np.random.default_rng(0)
    records = []
    for image_id in range(15):
        boxes, labels, difficult = [], [], []
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 70), rng.uniform(0, 50)
            boxes.append([x, y, x + rng.uniform(8, 30), y + rng.uniform(8, 30)])
            labels.append(rng.integers(1, 4))
            difficult.append(labels[-1] == 3 or rng.random() < 0.2)
        records.append(record(image_id, boxes, labels, difficult))
    predictions = []
    for image_id, boxes, scores, labels in noisy_detections(records, 4, seed=2):
        predictions += [(image_id, int(lab), float(s), tuple(b)) for b, s, lab in zip(boxes.tolist(), scores, labels)]
    return records, predictions


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_voc_evaluator_matches_brute_force(voc_case, use_07_metric):
    records, predictions = voc_case
    evaluator = VOCEvaluator(records, ["a", "b", "c", "d"], use_07_metric)
    evaluator.extend(pickle.loads(pickle.dumps(predictions)))
    result = evaluator.compute()
    expected = brute_force_voc(records, predictions, 4, use_07_metric)
    np.testing.assert_allclose(list(result["AP_per_class"].values()), expected, rtol=0, atol=1e-12)
    assert math.isnan(expected[2]) and math.isnan(expected[3]) and 0.1 < expected[0] < 1
    assert result["mAP"] == pytest.approx(np.mean(expected[:2]))


@pytest.mark.parametrize("use_07_metric, expected", [(True, 28 / 33), (False, 5 / 6)])
def test_voc_hand_computed(use_07_metric, expected):
    gt = record(0, [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [1, 1, 1], [False, False, True])
    evaluator = VOCEvaluator([gt], ["thing"], use_07_metric)
    evaluator.update(0, np.array([[0, 0, 10, 10],  # TP
                                  [40, 40, 50, 50],  # on the difficult one: ignored
                                  [0, 0, 10, 9],  # IoU 0.9 with a matched box: duplicate, FP
                                  [20, 20, 30, 30]]),  # TP
                     np.array([0.9, 0.85, 0.8, 0.7]), np.array([1, 1, 1, 1]))
    # ranked: TP, FP, TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # VOC07: 6 thresholds 0..0.5 at precision 1, 5 thresholds 0.6..1 at 2/3 -> 28/33; VOC2010: 1/2 * 1 + 1/2 * 2/3
    result = evaluator.compute()
    assert result["mAP"] == pytest.approx(expected) and result["AP_per_class"]["thing"] == pytest.approx(expected)
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1, 0.5, 2 / 3]), use_07_metric) == pytest.approx(expected)


def test_voc_zero_predictions(voc_case):
    records, _ = voc_case
    result = VOCEvaluator(records, ["a", "b", "c", "d"], use_07_metric=False).compute()
    assert result["mAP"] == 0.0
    assert [ap if not math.isnan(ap) else "nan" for ap in result["AP_per_class"].values()] == [0, 0, "nan", "nan"]


def test_per_class_table():
    table = format_per_class_table({"cat": 0.5, "dog": 0.25, "cow": math.nan})
    assert table.splitlines() == ["| class | AP (%) |", "|---|---:|", "| cat | 50.0 |", "| dog | 25.0 |",
                                  "| cow | n/a |", "| **mean** | 37.5 |"]
