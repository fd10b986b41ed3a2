"""The evaluation pages (engine.report, detection.report, segmentation.report, tools/browse_dataset.py): the
TIDE-style error breakdown on hand-made cases with known answers, the confusion matrix, the numbers of each page
against metrics.json, and every page opened in headless Chromium (no console error, no network request, the
tables and charts there with the expected counts, a screenshot that is not blank)."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.error_analysis import analyze_errors
from detection.evaluation import CocoEvaluator
from detection.report import confusion_matrix
from engine.checkpoint import start_run
from engine.report import prepare_report_dir
from segmentation.evaluation import SegmentationEvaluator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # the tools import each other as torchvision's references do

import benchmark_report  # noqa: E402
import browse_dataset  # noqa: E402
import test_det  # noqa: E402
import test_seg  # noqa: E402
import train_seg  # noqa: E402

NAMES = ("a", "b")


# ---------------------------------------------------------------- hand-made ground truth and detections
def coco(objects: list[tuple[int, int, list[float]]], images: int = 2, crowd: list[tuple[int, int, list]] = ()) -> dict:
    """A COCO dict: objects (image id, category id, xywh box), crowd regions likewise; classes a=1, b=2."""
    annotations = [{"id": i, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0} for i, (image, cat, box) in enumerate(objects, start=1)]
    annotations += [{"id": 1000 + i, "image_id": image, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                     "iscrowd": 1} for i, (image, cat, box) in enumerate(crowd)]
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in range(1, images + 1)],
            "annotations": annotations, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def det(image: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image, "category_id": cat, "bbox": box, "score": score}


BOX = [10.0, 10.0, 50.0, 50.0]
HALF_AP = 51 / 101  # COCO's 101-point AP of a ranking that finds half the objects at precision 1


def test_right_box_wrong_class_is_a_classification_error_worth_its_ap():
    gt = coco([(1, 1, BOX), (2, 1, BOX)])
    breakdown = analyze_errors(gt, [det(1, 1, BOX, 0.9), det(2, 2, BOX, 0.8)])
    assert breakdown.counts == {"classification": 1, "localisation": 0, "both": 0, "duplicate": 0, "background": 0,
                                "missed": 0}  # the object the wrong class sits on is not "missed": a fix finds it
    assert breakdown.ap == pytest.approx(HALF_AP) and math.isnan(breakdown.ap_per_class["b"])  # b: no objects
    assert breakdown.delta["classification"] == pytest.approx(1 - HALF_AP)  # relabelled: both objects found
    assert all(breakdown.delta[e] == 0 for e in ("localisation", "both", "duplicate", "background", "missed"))
    assert breakdown.delta["false negatives"] == pytest.approx(1 - HALF_AP)


def test_a_second_match_is_a_duplicate_and_costs_what_its_rank_costs():
    gt = coco([(1, 1, BOX), (2, 1, BOX)])
    shifted = [12.0, 10.0, 50.0, 50.0]
    breakdown = analyze_errors(gt, [det(1, 1, BOX, 0.9), det(1, 1, shifted, 0.85), det(2, 1, BOX, 0.8)])
    assert breakdown.counts["duplicate"] == 1 and sum(breakdown.counts.values()) == 1
    expected = (51 * 1 + 50 * 2 / 3) / 101  # precision 1 up to recall 0.5, then 2/3 (the duplicate ranked second)
    assert breakdown.ap == pytest.approx(expected) and breakdown.delta["duplicate"] == pytest.approx(1 - expected)
    assert breakdown.delta["false positives"] == pytest.approx(1 - expected)


def test_localisation_both_background_and_missed():
    gt = coco([(1, 1, BOX), (1, 2, [120.0, 120.0, 40.0, 40.0]), (2, 1, [100.0, 100.0, 30.0, 30.0])], images=3)
    loose = [10.0, 10.0, 50.0, 125.0]  # IoU 2500 / 6250 = 0.4 with the first a: localisation if a, "both" if b
    breakdown = analyze_errors(gt, [
        det(1, 1, loose, 0.9),                        # a on a, IoU 0.4: localisation
        det(1, 1, [120.0, 120.0, 40.0, 60.0], 0.7),   # a on b at IoU 0.67: classification
        det(1, 2, [110.0, 0.0, 30.0, 30.0], 0.6),     # nothing near: background
        det(3, 1, BOX, 0.5),                          # image 3 has no object at all: background
    ])
    assert breakdown.counts == {"classification": 1, "localisation": 1, "both": 0, "duplicate": 0, "background": 2,
                                "missed": 1}  # image 2's object: no detection points at it
    both = analyze_errors(gt, [det(1, 2, loose, 0.9)])  # b on a at IoU 0.4
    assert both.counts["both"] == 1 and both.counts["missed"] == 3  # "both" errors fix nothing: every object missed
    fixed_box = analyze_errors(gt, [det(1, 1, loose, 0.9)])
    assert fixed_box.ap_per_class["a"] == 0 and fixed_box.delta_per_class["a"]["localisation"] == pytest.approx(
        HALF_AP)  # the loose box becomes a's first object: half of a's two objects at precision 1


def test_detections_on_crowd_regions_are_ignored_and_objects_past_100_detections_do_not_count():
    gt = coco([(1, 1, BOX)], crowd=[(1, 1, [100.0, 100.0, 90.0, 90.0])])
    inside_crowd = [det(1, 1, [110.0, 110.0, 20.0, 20.0], 0.95)]
    assert analyze_errors(gt, inside_crowd + [det(1, 1, BOX, 0.5)]).ap == pytest.approx(1.0)
    clutter = [det(1, 1, [150.0, 10.0, 20.0, 20.0], 0.9) for _ in range(100)]
    assert analyze_errors(gt, clutter + [det(1, 1, BOX, 0.1)]).ap == 0  # the 101st detection is cut, as COCOeval


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_the_breakdowns_baseline_is_cocoevals_ap50(backend):
    rng = np.random.default_rng(0)
    objects, crowd, detections = [], [], []
    for image in range(1, 61):
        for _ in range(rng.integers(0, 6)):
            x, y, w, h = *rng.uniform(0, 140, 2), *rng.uniform(8, 60, 2)
            cat = int(rng.integers(1, 3))
            (crowd if rng.random() < 0.05 else objects).append((image, cat, [x, y, w, h]))
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 0.2, 4) * [w, h, w, h]
                detections.append(det(image, cat if rng.random() < 0.8 else 3 - cat,
                                      [x + jitter[0], y + jitter[1], max(1, w + jitter[2]), max(1, h + jitter[3])],
                                      float(rng.random())))
        detections += [det(image, int(rng.integers(1, 3)), [*rng.uniform(0, 150, 2), 30, 30], float(rng.random()))
                       for _ in range(rng.integers(0, 3))]
    gt = coco(objects, images=60, crowd=crowd)
    evaluator = CocoEvaluator(gt, [1, 2], backend=backend)
    evaluator.extend(detections)
    metrics = evaluator.compute()
    breakdown = analyze_errors(gt, detections)
    assert 0.1 < metrics["AP50"] < 0.9
    assert breakdown.ap == pytest.approx(metrics["AP50"], abs=1e-12)
    assert breakdown.ap_per_class == pytest.approx(metrics["AP50_per_class"], abs=1e-12)
    assert all(gain >= -1e-12 for gain in breakdown.delta.values())  # fixing never costs AP
    assert breakdown.delta["false positives"] >= max(breakdown.delta[e] for e in ("background", "duplicate", "both"))


def test_confusion_matrix_has_background_row_and_missed_column():
    gt = coco([(1, 1, BOX), (1, 2, [120.0, 120.0, 40.0, 40.0]), (2, 1, BOX)],
              crowd=[(2, 2, [120.0, 120.0, 60.0, 60.0])])
    matrix, names = confusion_matrix(gt, [
        det(1, 2, BOX, 0.9),                          # a seen as b
        det(1, 2, [120.0, 120.0, 40.0, 40.0], 0.8),   # b right
        det(1, 1, [150.0, 10.0, 20.0, 20.0], 0.7),    # a on background
        det(2, 1, BOX, 0.3),                          # below the score threshold: not counted, so a is missed
        det(2, 2, [125.0, 125.0, 20.0, 20.0], 0.9),   # on the crowd region: neither a detection nor a miss
    ])
    assert names == list(NAMES)
    np.testing.assert_array_equal(matrix, [[0, 1, 1],    # a: seen as b once, missed once
                                           [0, 1, 0],    # b: right
                                           [1, 0, 0]])   # no object: one a on background


# ---------------------------------------------------------------- pages of real (tiny) runs
class Tables(HTMLParser):
    """Cell texts of every <table id=...> of a page, row by row, and the count of gallery figures."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.figures = 0
        self._table = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""
        elif tag == "figure":
            self.figures += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def shown(value) -> str:
    """How the page prints a fraction: percent with one decimal; n/a for none / nan / COCO's -1."""
    return "n/a" if value is None or value != value or value == -1 else f"{100 * value:.1f}"


def rows(tables: Tables, table_id: str) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in tables.tables[table_id][1:]}


def test_detection_page_equals_metrics_json(tiny_det_run):
    metrics = json.loads((tiny_det_run / "metrics.json").read_text())
    page = Tables((tiny_det_run / "report" / "index.html").read_text())
    headline = rows(page, "headline-table")
    assert len(headline) == 12 and all(headline[key] == [shown(metrics[key])] for key in headline)
    per_class = rows(page, "per-class-table")
    assert list(per_class) == ["circle", "square", "triangle"]
    for name, (objects, detections, ap, ap50, ar) in per_class.items():
        assert [ap, ap50, ar] == [shown(metrics[k][name]) for k in ("AP_per_class", "AP50_per_class", "AR_per_class")]
    sizes = rows(page, "size-table")
    assert [sizes[s][1:] for s in ("small", "medium", "large")] == [
        [shown(metrics[f"AP{s}"]), shown(metrics[f"AR{s}"])] for s in "sml"]
    errors = rows(page, "error-class-table")  # the breakdown's own AP50 is COCOeval's
    assert {name: values[0] for name, values in errors.items()} == {
        name: shown(value) for name, value in metrics["AP50_per_class"].items()}
    thumbnails = list((tiny_det_run / "report" / "images").glob("*_thumb.jpg"))
    assert 1 <= page.figures <= 24 and len(thumbnails) == page.figures


def test_test_det_writes_its_own_report_and_voc_pages_agree_too(tiny_det_run, tmp_path):
    out = tmp_path / "voc.json"
    metrics = test_det.main(["--config", str(tiny_det_run / "config.yaml"), "--checkpoint",
                             str(tiny_det_run / "last.pth"), "--out", str(out), "--report-images", "2",
                             "eval.metric=voc07"])
    page = Tables((tmp_path / "voc_report" / "index.html").read_text())  # named after --out
    assert rows(page, "headline-table") == {"mAP": [shown(metrics["mAP"])]}
    assert {name: values[2] for name, values in rows(page, "per-class-table").items()} == {
        name: shown(ap) for name, ap in json.loads(out.read_text())["AP_per_class"].items()}
    assert page.figures == 2
    with pytest.raises(SystemExit):  # never into the training run's own report
        test_det.main(["--config", str(tiny_det_run / "config.yaml"), "--checkpoint", str(tiny_det_run / "last.pth"),
                       "--report", str(tiny_det_run / "report")])


def test_report_folders_are_replaced_only_when_they_hold_a_report_and_overwrite_removes_them(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"not a report")
    with pytest.raises(FileExistsError, match="not an earlier report"):
        prepare_report_dir(photos)
    assert (photos / "holiday.jpg").is_file()
    run = tmp_path / "run"
    (run / "report" / "images").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / "eval_metrics_report").mkdir()
    start_run(run, {}, overwrite=True)
    assert not (run / "report").exists() and not (run / "eval_metrics_report").exists()


@pytest.fixture(scope="module")
def tiny_seg_run(tmp_path_factory) -> Path:
    """DeepLabV3+ R18 on generated shapes, 2 iterations, evaluated on 3 val images (seconds)."""
    tmp = tmp_path_factory.mktemp("tiny_seg")
    train_seg.main(["data.synthetic.enabled=true", f"data.root={tmp / 'shapes'}", f"output_dir={tmp / 'run'}",
                    "data.num_workers=0", "data.crop_size=48", "train.batch_size=2", "data.val_limit=3",
                    "train.log_every=1", "train.iters=2"])
    return tmp / "run"


def test_segmentation_page_equals_metrics_json(tiny_seg_run, tmp_path):
    metrics = json.loads((tiny_seg_run / "metrics.json").read_text())
    page = Tables((tiny_seg_run / "report" / "index.html").read_text())
    assert rows(page, "headline-table") == {"mIoU": [shown(metrics["mIoU"])],
                                            "pixel accuracy": [shown(metrics["pixel_acc"])],
                                            "mean class accuracy": [shown(metrics["mean_acc"])]}
    per_class = rows(page, "per-class-table")
    assert list(per_class) == list(metrics["IoU_per_class"])
    assert all(values[2:] == [shown(metrics["IoU_per_class"][name]), shown(metrics["acc_per_class"][name])]
               for name, values in per_class.items())
    assert page.figures == 3  # the 3 val images, worst first
    test_seg.main(["--config", str(tiny_seg_run / "config.yaml"), "--checkpoint", str(tiny_seg_run / "last.pth"),
                   "--out", str(tmp_path / "seg.json"), "--report-images", "1"])
    assert Tables((tmp_path / "seg_report" / "index.html").read_text()).figures == 1


def test_per_image_miou_leaves_the_summed_matrix_unchanged():
    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 3, (2, 8, 8)), rng.integers(0, 3, (2, 8, 8))
    target[0, 0] = 255
    plain, per_image = SegmentationEvaluator(3), SegmentationEvaluator(3)
    plain.update(pred, target)
    per_image.update(pred, target, image_indices=[5, 7])
    assert torch.equal(plain.confusion, per_image.confusion) and set(per_image.image_miou) == {5, 7}
    one = SegmentationEvaluator(3)
    one.update(pred[1], target[1])
    assert per_image.image_miou[7] == pytest.approx(one.compute()["mIoU"])


@pytest.fixture(scope="module")
def browse_pages(tiny_det_run, tiny_seg_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("browse")
    return {"detection": browse_dataset.main(["--config", str(tiny_det_run / "config.yaml"), "--num", "3",
                                              "--out", str(out / "det")]),
            "segmentation": browse_dataset.main(["--config", str(tiny_seg_run / "config.yaml"), "--split", "val",
                                                 "--num", "2", "--out", str(out / "seg")])}


def test_browse_pages_draw_the_samples_and_count_the_classes(browse_pages):
    det_page = Tables(browse_pages["detection"].read_text())
    assert det_page.figures == 3 and list(rows(det_page, "class-table")) == ["circle", "square", "triangle"]
    seg_page = Tables(browse_pages["segmentation"].read_text())
    assert seg_page.figures == 2 and list(rows(seg_page, "class-table"))[0] == "background"


# ---------------------------------------------------------------- the pages in a real browser
def chromium() -> str | None:
    """Debian's chromium (`make test` installs it where apt-get can), or the binary RESDET_CHROMIUM names."""
    return os.environ.get("RESDET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_pages_in_headless_chromium(tiny_det_run, tiny_seg_run, browse_pages, tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium, done by `make test` where "
                    "apt-get is available; elsewhere install Chromium or Chrome and set RESDET_CHROMIUM=/path/to/it)")
    from playwright.sync_api import sync_playwright
    from PIL import Image

    det_classes, seg_classes = 3, 4
    expectations = {  # page: ({CSS selector: count}, {plotly div id: traces})
        tiny_det_run / "report" / "index.html": (
            {"#per-class-table tbody tr": det_classes, "#confusion-table tbody tr": det_classes + 1,
             "#error-class-table tbody tr": det_classes, ".js-plotly-plot": 6},
            {"pr-curves": det_classes, "confusion-matrix": 1, "error-breakdown": 1}),
        tiny_seg_run / "report" / "index.html": (
            {"#per-class-table tbody tr": seg_classes, ".gallery figure": 3, ".js-plotly-plot": 4},
            {"confusion-matrix": 1}),
        browse_pages["detection"]: ({"#class-table tbody tr": det_classes, ".gallery figure": 3}, {"class-counts": 1}),
        browse_pages["segmentation"]: ({"#class-table tbody tr": seg_classes, ".gallery figure": 2},
                                       {"class-counts": 1}),
    }
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        try:
            for number, (path, (counts, traces)) in enumerate(expectations.items()):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                problems, requests = [], []
                page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
                page.on("request", lambda r: requests.append(r.url))
                page.goto(path.resolve().as_uri(), wait_until="load")
                page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length == "
                                       "document.querySelectorAll('.plotly-graph-div').length")
                assert problems == [], (path, problems)
                assert all(url.startswith("file://") for url in requests), (path, requests)
                for selector, count in counts.items():
                    assert page.locator(selector).count() == count, (path, selector)
                for div, count in traces.items():
                    assert page.evaluate(f"document.getElementById('{div}').data.length") == count, (path, div)
                assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)"), path
                shot = tmp_path / f"{number}.png"
                page.screenshot(path=str(shot), full_page=True)
                pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
                assert pixels.std() > 20 and len(np.unique(pixels)) > 64, (path, "blank screenshot")
                page.close()
        finally:
            browser.close()


def test_build_time_benchmark_runs_small():
    result = benchmark_report.main(["--images", "30", "--classes", "5", "--gallery", "2", "--threads", "1"])
    assert result["detections"] == 3000 and 0 < result["AP50"] < 1 and result["report_s"] > 0
