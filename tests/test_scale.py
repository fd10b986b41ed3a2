"""COCO-scale start-up (issue 21): header checks instead of decoding every image, records in one fork-shared
store, full checks that resume after an interruption, and a corrupt image met mid-training handled as
data.skip_invalid says, with the same result for any num_workers. tools/benchmark_scale.py measures the scale
itself; its simulated COCO is checked here at a tiny size."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import train_det  # noqa: E402

from datafiles.images import read_header  # noqa: E402
import datafiles.validation as validation  # noqa: E402
from datafiles.validation import InvalidFiles, validation_mode  # noqa: E402
from detection.datasets import (BOX_TOLERANCE, DatasetError, DetectionDataset, ImageRecord, ImageRecords,  # noqa: E402
                                _checked_box, load_coco_records, validate_records)
from detection.synthetic import generate_shapes_dataset  # noqa: E402
from experiments import scale_benchmark  # noqa: E402


# ------------------------------------------------------------------ the header check

def photo(width: int = 40, height: int = 30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


HEADER_CASES = {
    "baseline.jpg": lambda: saved(photo(), "JPEG"),
    "progressive.jpg": lambda: saved(photo(33, 17), "JPEG", progressive=True),
    "grey.jpg": lambda: saved(photo().convert("L"), "JPEG"),
    "cmyk.jpg": lambda: saved(photo().convert("CMYK"), "JPEG"),
    "big_app_segments.jpg": lambda: saved(photo(), "JPEG", icc_profile=bytes(9000), comment=b"x" * 5000),
    "rgb.png": lambda: saved(photo(), "PNG"),
    "palette.png": lambda: saved(photo().convert("P"), "PNG"),
    "grey.png": lambda: saved(photo().convert("L"), "PNG"),
    "rgba.png": lambda: saved(photo().convert("RGBA"), "PNG"),
    "bitmap.bmp": lambda: saved(photo(), "BMP"),
    "animation.gif": lambda: saved(photo().convert("P"), "GIF"),
}


@pytest.mark.parametrize("name", sorted(HEADER_CASES))
def test_read_header_agrees_with_pil(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(HEADER_CASES[name]())
    with Image.open(path) as image:
        expected = {"format": image.format, "size": list(image.size), "mode": image.mode}
    assert read_header(path) == expected


@pytest.mark.parametrize("data", [saved(photo(), "JPEG")[:12], saved(photo(), "JPEG")[:100] + b"\x00" * 8,
                                  b"\xff\xd8\xff\xda\x00\x02", b"hello, I am text\n", b""])
def test_read_header_refuses_what_it_cannot_read(tmp_path, data):
    (tmp_path / "x.jpg").write_bytes(data)
    with pytest.raises((OSError, ValueError)):
        read_header(tmp_path / "x.jpg")


def coco_folder(tmp: Path, files: dict[str, bytes], size: tuple[int, int] = (40, 30)) -> tuple[Path, Path]:
    folder = tmp / "images"
    folder.mkdir(parents=True)
    images = []
    for image_id, (name, data) in enumerate(files.items(), 1):
        (folder / name).write_bytes(data)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
    annotations = [{"id": i["id"], "image_id": i["id"], "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0}
                   for i in images]
    (tmp / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                              "categories": [{"id": 1, "name": "thing"}]}))
    return folder, tmp / "ann.json"


def test_header_check_refuses_bad_headers_without_decoding_anything(tmp_path, monkeypatch):
    jpeg = saved(photo(), "JPEG")
    files = {"good.jpg": jpeg, "body_cut.jpg": jpeg[: len(jpeg) * 2 // 3], "head_cut.jpg": jpeg[:12],
             "empty.jpg": b"", "text.jpg": b"hello\n", "other_size.jpg": saved(photo(41, 30), "JPEG"),
             "gif.jpg": HEADER_CASES["animation.gif"]()}
    records, _, _ = load_coco_records(*coco_folder(tmp_path, files))
    monkeypatch.setattr(validation, "_inspect", lambda check: pytest.fail(f"decoded {check.path}"))
    kept = validate_records(records, validate="header", skip_invalid=True, report_dir=tmp_path / "out")
    assert [Path(r.path).name for r in kept] == ["good.jpg", "body_cut.jpg"]  # a cut body has an intact header
    listed = (tmp_path / "out" / "invalid_train.txt").read_text()
    for name, problem in [("head_cut", "cannot decode"), ("empty", "empty"), ("text", "cannot decode"),
                          ("other_size", "41x30"), ("gif", "GIF")]:
        assert any(f"{name}.jpg" in line and problem in line for line in listed.splitlines()), (name, listed)


def test_auto_decodes_small_splits_and_reads_headers_of_large_ones():
    limit = validation.FULL_DECODE_LIMIT
    assert [validation_mode("auto", n) for n in (1, limit, limit + 1)] == ["full", "full", "header"]
    assert [validation_mode(v, 10 ** 6) for v in ("full", "header", False)] == ["full", "header", None]
    with pytest.raises(ValueError, match="data.validate='fast'"):
        validation_mode("fast", 1)


def test_interrupted_full_check_resumes_from_its_cache(tmp_path, monkeypatch):
    files = {f"{i}.png": cv2.imencode(".png", np.full((30, 40, 3), i, np.uint8))[1].tobytes() for i in range(10)}
    records, _, _ = load_coco_records(*coco_folder(tmp_path, files))
    monkeypatch.setattr(validation, "CACHE_FLUSH_EVERY", 2)
    monkeypatch.setattr(validation, "CHUNK", 1)
    decoded, inspect = [], validation._inspect

    def interrupted_after_five(check):
        if len(decoded) == 5:
            raise KeyboardInterrupt
        decoded.append(check.path.name)
        return inspect(check)

    monkeypatch.setattr(validation, "_inspect", interrupted_after_five)
    with pytest.raises(KeyboardInterrupt):
        validate_records(records, validate="full", num_workers=1, cache_dir=tmp_path / "cache")
    assert len(decoded) == 5
    monkeypatch.setattr(validation, "_inspect", lambda check: decoded.append(check.path.name) or inspect(check))
    assert len(validate_records(records, validate="full", num_workers=1, cache_dir=tmp_path / "cache")) == 10
    assert set(decoded) == set(files) and len(decoded) == 10  # the 5 decoded before the interruption were cached
    decoded.clear()
    validate_records(records, validate="full", cache_dir=tmp_path / "cache")
    assert decoded == []


def numpy_checked_box(box, width, height):
    """One box checked as detection.datasets did box by box before issue 21 (zero-size boxes now passed on to
    data.min_box_size): the reference for the vectorised check."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,) or not np.isfinite(b).all():
        return None, "is not 4 finite numbers"
    if b[0] < -BOX_TOLERANCE or b[1] < -BOX_TOLERANCE or b[2] > width + BOX_TOLERANCE or b[3] > height + BOX_TOLERANCE:
        return None, f"lies outside the {width}x{height} image"
    b = np.clip(b, 0, [width, height, width, height])
    if b[2] < b[0] or b[3] < b[1]:
        return None, "has negative width or height"
    return b.astype(np.float32), ""


def test_vectorised_box_check_gives_the_per_box_results_bit_for_bit():
    rng = np.random.default_rng(0)
    edges = [-2, -1, -0.5, -0.0, 0, 0.3, 1, 5, 19.9999999, 20, 20.5, 21, 22, 16, 16.7, 17.5, float("nan"),
             float("inf"), 1e300, 2 ** 60 + 1, 1 / 3]
    for _ in range(20_000):
        box = [edges[i] if rng.random() < 0.7 else float(rng.uniform(-3, 25)) for i in rng.integers(0, len(edges), 4)]
        (got, why), (expected, expected_why) = _checked_box(box, 20, 16), numpy_checked_box(box, 20, 16)
        assert why == expected_why, box
        assert got is None if expected is None else got.tobytes() == expected.tobytes(), box


def reference_coco_load(images_dir: Path, annotations: Path) -> tuple[list[ImageRecord], list[str]]:
    """COCO loading image by image and annotation by annotation (the pre-issue-21 code path, without its checks
    of ids and file names, which the fuzzed file below keeps valid): (records, problems in file order)."""
    data = json.loads(annotations.read_text())
    label_of = {c["id"]: k for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]), start=1)}
    records, problems = [], []
    for img in data["images"]:
        path, width, height = images_dir / img["file_name"], img.get("width"), img.get("height")
        if any(v is not None and not (type(v) is int and v > 0) for v in (width, height)):
            problems.append(f"{annotations}: image id {img['id']} ({img['file_name']}): width {width!r} / height "
                            f"{height!r} must be positive integers (or absent: then read from the file)")
            continue
        if not path.is_file():
            problems.append(f"{annotations}: image id {img['id']}: file {path} does not exist")
            continue
        if not (width and height):
            width, height = Image.open(path).size
        boxes, labels, ignore = [], [], []
        for ann in (a for a in data["annotations"] if a["image_id"] == img["id"]):
            where = f"{annotations}: annotation id {ann['id']} (image {path.name})"
            category, bbox, crowd = ann["category_id"], ann["bbox"], ann.get("iscrowd", 0)
            if type(category) is not int or category not in label_of:
                problems.append(f"{where}: category_id {category!r} is not in 'categories'")
            elif not (type(bbox) is list and len(bbox) == 4 and all(type(v) in (int, float) for v in bbox)):
                problems.append(f"{where}: bbox {bbox!r} must be a list of 4 numbers [x, y, width, height]")
            elif crowd not in (0, 1) or isinstance(crowd, float):
                problems.append(f"{where}: iscrowd {crowd!r} must be 0 or 1")
            else:
                x, y, w, h = (float(v) if abs(v) < 1e308 else float("inf") for v in bbox)
                box, why = numpy_checked_box([x, y, x + w, y + h], width, height)
                if box is None:
                    problems.append(f"{where}: bbox {bbox} (xywh) {why}")
                else:
                    boxes.append(box), labels.append(label_of[category]), ignore.append(bool(crowd))
        records.append(ImageRecord(str(path), width, height, np.array(boxes, np.float32).reshape(-1, 4),
                                   np.array(labels, np.int64), np.array(ignore, bool), img["id"]))
    return records, problems


def test_coco_loaded_all_at_once_equals_image_by_image_loading(tmp_path, caplog):
    """Fuzzed annotations of every kind, good and bad, in shuffled order: the same records and the same problems
    in the same order as the per-annotation reference."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    images, sizes = [], []
    for image_id in range(1, 121):
        name, width, height = f"{image_id:03d}.jpg", int(rng.integers(8, 40)), int(rng.integers(8, 40))
        sizes.append((width, height))
        if rng.random() > 0.05:  # else the file is missing
            Image.new("RGB", (width, height)).save(folder / name)
        image = {"id": image_id * 7, "file_name": name, "width": width, "height": height}
        if rng.random() < 0.05:
            image["width"] = [-1, 0, 2.5, "9", True][int(rng.integers(5))]
        elif rng.random() < 0.05:
            del image["width"], image["height"]  # read from the file
        images.append(image)
    odd = [0, -0.5, -1.5, 0.4, float("nan"), float("inf"), 10 ** 400, 99, True, "2", None]
    annotations = []
    for ann_id in range(1, 1501):
        index = int(rng.integers(0, 120))
        width, height = sizes[index]
        x, y = rng.uniform(-1, width), rng.uniform(-1, height)
        bbox = [round(float(v), 2) for v in (x, y, rng.uniform(-0.5, width - x + 1), rng.uniform(-0.5, height - y + 1))]
        bbox = [odd[int(rng.integers(len(odd)))] if rng.random() < 0.02 else int(v) if rng.random() < 0.2 else v
                for v in bbox]
        if rng.random() < 0.01:
            bbox = [bbox[:3], "1 2 3 4", None, {"x": 1}][int(rng.integers(4))]
        ann = {"id": ann_id, "image_id": (index + 1) * 7, "bbox": bbox,
               "category_id": ([1, 3, 9][int(rng.integers(3))] if rng.random() < 0.97
                               else [4, True, "3", 3.0][int(rng.integers(4))]),
               "iscrowd": int(rng.random() < 0.1) if rng.random() < 0.97 else [True, 2, 0.0, "0"][int(rng.integers(4))]}
        if rng.random() < 0.1:
            del ann["iscrowd"]
        annotations.append(ann)
    categories = [{"id": 9, "name": "c9"}, {"id": 1, "name": "c1"}, {"id": 3, "name": "c3"}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))
    expected_records, expected_problems = reference_coco_load(folder, tmp_path / "ann.json")
    assert 50 < len(expected_problems) < 800 and len(expected_records) > 100  # every kind, not all bad

    caplog.set_level(logging.WARNING, logger="detection.datasets")
    records, names, cat_ids = load_coco_records(folder, tmp_path / "ann.json", skip_invalid=True)
    problems = [r.getMessage().removeprefix("skipped: ") for r in caplog.records
                if r.getMessage().startswith("skipped:")]
    assert problems == expected_problems
    assert (names, cat_ids) == (["c1", "c3", "c9"], [1, 3, 9])
    assert len(records) == len(expected_records) and all(map(same_record, records, expected_records))
    with pytest.raises(DatasetError) as first:
        load_coco_records(folder, tmp_path / "ann.json")
    assert str(first.value) == expected_problems[0]


# ------------------------------------------------------------------ the records store

def some_records(count: int) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        n = int(rng.integers(0, 4))
        records.append(ImageRecord(path=f"/data/é{i}.jpg", width=int(rng.integers(10, 99)), height=50,
                                   boxes=rng.random((n, 4), dtype=np.float32), labels=rng.integers(1, 9, n),
                                   ignore=rng.random(n) < 0.3, image_id=1000 + i))
    return records


def same_record(a: ImageRecord, b: ImageRecord) -> bool:
    return ((a.path, a.width, a.height, a.image_id) == (b.path, b.width, b.height, b.image_id)
            and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
            and np.array_equal(a.ignore, b.ignore) and a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
            and a.ignore.dtype == bool)


def test_records_store_gives_the_same_records_back():
    originals = some_records(50)
    store = ImageRecords.from_records(originals)
    assert len(store) == 50 and all(same_record(s, o) for s, o in zip(store, originals))
    assert same_record(store[-1], originals[-1])
    assert all(same_record(s, originals[i]) for s, i in zip(store.select([7, 3, 3]), [7, 3, 3]))
    assert all(same_record(s, o) for s, o in zip(store[10:20:3], originals[10:20:3]))
    assert all(same_record(s, o) for s, o in zip(pickle.loads(pickle.dumps(store)), originals))
    assert store.aspect_ratios().tolist() == [r.width / r.height for r in originals]
    assert store.count_objects() == (sum(len(r.labels) for r in originals),
                                     sum(int((~r.ignore).sum()) for r in originals))
    with pytest.raises(ValueError):
        store[1].boxes[:] = 0  # views of the shared store are read-only
    with pytest.raises(IndexError):
        store[50]
    assert len(ImageRecords.from_records([])) == 0 and len(store.select([])) == 0


def private_growth_reading_all_in_a_fork(records) -> int:
    """Private_Dirty bytes a forked child adds by reading every record (copy-on-write copies)."""
    def private() -> int:
        text = Path("/proc/self/smaps_rollup").read_text()
        return sum(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("Private_Dirty"))

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private()
        for record in records:
            record.boxes.sum()
        os.write(write, str(private() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return int(os.read(read, 64))


def test_forked_workers_read_the_store_without_copying_it():
    records = some_records(60_000)
    store = ImageRecords.from_records(records)
    as_objects, as_store = private_growth_reading_all_in_a_fork(records), private_growth_reading_all_in_a_fork(store)
    assert as_objects > 10 * 2 ** 20, as_objects  # the measurement sees Python objects' refcounts copy pages
    assert as_store < 2 * 2 ** 20, as_store


# ------------------------------------------------------------------ a corrupt image met mid-training

@pytest.fixture(scope="module")
def shapes_with_a_cut_image(tmp_path_factory) -> tuple[Path, str]:
    """8 generated train images, one of them cut short after its header (the header check passes it)."""
    root = generate_shapes_dataset(tmp_path_factory.mktemp("cut") / "shapes", num_train=8, num_val=2, image_size=64)
    victim = sorted((root / "train").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size * 3 // 5])
    return root, victim.name


def train(root: Path, out: Path, *overrides: str) -> dict:
    return train_det.main(["data.synthetic.enabled=false", f"data.root={root}", f"output_dir={out}",
                           "data.validate=header", "data.min_size=[64]", "data.max_size=64",
                           "model.anchor_sizes=[8,16,32,64,128]", "model.rpn.pre_nms_top_n_test=100",
                           "model.rpn.post_nms_top_n_test=50", "model.roi.batch_size_per_image=32",
                           "train.batch_size=4", "train.iters=4", "train.warmup_iters=1", "train.log_every=1",
                           *overrides])


def test_corrupt_image_mid_training_is_skipped_the_same_for_any_worker_count(shapes_with_a_cut_image, tmp_path):
    root, victim = shapes_with_a_cut_image
    for workers in (0, 2):
        train(root, tmp_path / f"w{workers}", "data.skip_invalid=true", f"data.num_workers={workers}")
    listed = [(tmp_path / f"w{w}" / "invalid_train.txt").read_text() for w in (0, 2)]
    assert listed[0] == listed[1] and len(listed[0].splitlines()) == 1  # met in both epochs, listed once
    assert victim in listed[0] and "cannot decode" in listed[0]
    weights = [torch.load(tmp_path / f"w{w}" / "last.pth", weights_only=True)["model"] for w in (0, 2)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert (tmp_path / "w0" / "history.jsonl").read_text() == (tmp_path / "w2" / "history.jsonl").read_text()


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_mid_training_stops_the_run_naming_it(shapes_with_a_cut_image, tmp_path, workers):
    root, victim = shapes_with_a_cut_image
    with pytest.raises(DatasetError) as error:
        train(root, tmp_path / "run", f"data.num_workers={workers}")
    message = str(error.value)
    assert message.startswith(str(root / "train" / victim)) and "cannot decode" in message
    assert "Traceback" not in message and "worker" not in message  # the worker's own message, not torch's wrapper
    assert not (tmp_path / "run" / "last.pth").exists()


def test_skipped_image_is_replaced_in_training_and_dropped_in_evaluation(tmp_path):
    jpeg = saved(photo(), "JPEG")
    records, _, _ = load_coco_records(*coco_folder(tmp_path, {"a.jpg": jpeg, "cut.jpg": jpeg[:400], "c.jpg": jpeg}))
    report = tmp_path / "out" / "invalid_val.txt"
    training = DetectionDataset(records, invalid=InvalidFiles(True, report))
    assert training[1][1]["image_id"] == 3 and training[2][1]["image_id"] == 3  # the next usable image
    evaluation = DetectionDataset(records, invalid=InvalidFiles(True, report), replace_skipped=False)
    assert evaluation[1] is None and evaluation[0][1]["image_id"] == 1
    assert report.read_text().count("cut.jpg") == 1
    with pytest.raises(DatasetError, match=r"cut\.jpg \(from the annotation of image id 2\): cannot decode"):
        DetectionDataset(records, invalid=InvalidFiles(False))[1]
    with pytest.raises(DatasetError, match=r"cut\.jpg"):
        DetectionDataset([replace(records[1])])[0]  # no policy given: the error as it is


# ------------------------------------------------------------------ the benchmark's simulated COCO

def test_simulated_coco_has_coco_structure(tmp_path):
    sizes = dict(scale_benchmark.COCO_SIZES, train_images=60, train_boxes=301, val_images=7, val_boxes=20,
                 unique_images=5)
    data = scale_benchmark.build_simulated_coco(tmp_path / "sim", sizes)
    train = json.loads((data / "annotations" / "instances_train2017.json").read_text())
    assert len(train["images"]) == 60 and len(train["annotations"]) == 301
    assert [c["id"] for c in train["categories"]] == list(scale_benchmark.COCO_CATEGORY_IDS)
    assert len(scale_benchmark.COCO_CATEGORY_IDS) == 80 and max(scale_benchmark.COCO_CATEGORY_IDS) == 90
    first = data / "train2017" / train["images"][0]["file_name"]
    assert read_header(first) == {"format": "JPEG", "size": [640, 480], "mode": "RGB"}
    assert first.stat().st_nlink > 1  # a hard link to one of the 5 generated images
    records, names, cat_ids = load_coco_records(data / "train2017", data / "annotations" / "instances_train2017.json")
    assert len(records) == 60 and records.count_objects()[0] == 301 and cat_ids == sorted(cat_ids)
    assert scale_benchmark.build_simulated_coco(tmp_path / "sim", sizes) == data  # reused, not rebuilt
    with pytest.raises(SystemExit, match="other sizes"):
        scale_benchmark.build_simulated_coco(tmp_path / "sim", dict(sizes, train_boxes=302))
