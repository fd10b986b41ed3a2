"""Start-up, memory and evaluation of train_det at COCO 2017's size, beside the json loading of its peers.

    python tools/benchmark_scale.py                                   # data in ~/scale_coco, JSON on stdout
    python tools/benchmark_scale.py --root /data/scale --out docs/benchmark_scale.json --markdown

Builds (once; reused when its marker file matches) a simulated COCO 2017 in `--root`: 118,287 train images as
real 640x480 JPEG files (hard links to 2,000 generated images, so it costs ~180 MB of disk), 860,001 boxes with
COCO-like polygons (the json is ~430 MB, COCO's is 448 MB), 80 category ids with COCO's gaps, 5,000 val images with
36,781 boxes. Then measures, each in a fresh process, on `configs/det/r50_fpn_coco.yaml` (device=cpu, 2 loader
workers):

- time to iteration 1 of `tools/train_det.py`, cold (empty validation cache) and warm (the cache of the cold
  run), split by stage: start-up (imports, config), json read, records, validation, model build, first step
  (loop set-up, worker start, first batch, forward + backward);
- peak RSS of that process (VmHWM), and over >= 3,000 iterations of the training loop's own DataLoader the
  RSS / PSS (/proc/<pid>/smaps_rollup) of the main process and of each worker; worker growth = the rise of a
  worker's PSS per 1,000 loader iterations after the first 200 (least-squares slope);
- evaluation (`CocoEvaluator`, the default backend) of 5,000 images x 100 detections;
- the size and save time of a checkpoint of that model with its optimizer state;
- peers, same json, same run: pycocotools' `COCO(json)` alone; torchvision's detection reference
  (references/detection/coco_utils.py: `torchvision.datasets.CocoDetection`, i.e. pycocotools, plus its
  `_coco_remove_images_without_annotations`); Detectron2's `load_coco_json` + `NumpySerializedList`,
  re-implemented minimally here (Detectron2 is not on PyPI): time and peak RSS of each.

Every figure carries the load average at the time it was taken. `--checkout DIR` measures another ResDet
checkout's code with the same harness (the "before" figures). Nothing is written into the data folder after it
was built: caches and run folders go to `--root`/work.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                     31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                     56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                     85, 86, 87, 88, 89, 90)
"""COCO 2017's 80 category ids (1..90 with gaps)."""
COCO_SIZES = {"train_images": 118_287, "train_boxes": 860_001, "val_images": 5_000, "val_boxes": 36_781,
              "unique_images": 2_000, "width": 640, "height": 480}
MARKER = "SIMULATED_COCO.json"
CONFIG = ROOT / "configs" / "det" / "r50_fpn_coco.yaml"
LOADER_ITERS = 3_000
GROWTH_FROM = 200


# ------------------------------------------------------------------ the simulated COCO 2017

def generated_image(seed: int, width: int, height: int) -> bytes:
    """A 640x480 JPEG that compresses and decodes like a photo (smooth colour fields, shapes, sensor noise):
    ~90 KB, ~6 ms to decode with PIL here."""
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (width, height),
                       interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(image, centre, int(rng.integers(10, 120)), colour, -1)
    noisy = image.astype(np.int16) + rng.integers(-12, 13, image.shape, dtype=np.int16)
    return cv2.imencode(".jpg", np.clip(noisy, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _coordinates_text(values: np.ndarray) -> bytes:
    """Numbers in [0, 1000) with 2 decimals as fixed-width JSON text ("  1.50, 12.34,123.45,"): formatted in
    numpy, since Python's float formatting of ~45 million polygon coordinates takes minutes."""
    hundredths = np.round(values * 100).astype(np.int64)
    digits = np.stack([hundredths // 10 ** p % 10 for p in (4, 3, 2, 1, 0)], axis=1).astype(np.uint8) + ord("0")
    digits[:, 0][hundredths < 10_000] = ord(" ")
    digits[:, 1][hundredths < 1_000] = ord(" ")
    text = np.empty((len(values), 7), np.uint8)
    text[:, :3], text[:, 3], text[:, 4:6], text[:, 6] = digits[:, :3], ord("."), digits[:, 3:], ord(",")
    return text.tobytes()


def _annotations_json(rng: np.random.Generator, image_ids: np.ndarray, num_boxes: int, first_id: int,
                      width: int, height: int) -> tuple[bytes, int]:
    """The "annotations" list's text: boxes spread over all but ~0.9 % of the images (COCO's share without
    any), sizes log-uniform, 1 % crowd (uncompressed RLE), the others a polygon of 4..44 points in their box."""
    annotated = rng.choice(image_ids, size=len(image_ids) - len(image_ids) * 9 // 1000, replace=False)
    owner = np.sort(rng.choice(annotated, size=num_boxes))
    w = np.exp(rng.uniform(np.log(4), np.log(width - 2), num_boxes))
    h = np.clip(w * np.exp(rng.normal(0, 0.5, num_boxes)), 4, height - 2)
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    category = rng.choice(COCO_CATEGORY_IDS, size=num_boxes)
    crowd = rng.random(num_boxes) < 0.01
    points = rng.integers(4, 45, num_boxes)
    starts = np.concatenate([[0], np.cumsum(points)])
    px = rng.uniform(0, 1, starts[-1]) * np.repeat(w, points) + np.repeat(x, points)
    py = rng.uniform(0, 1, starts[-1]) * np.repeat(h, points) + np.repeat(y, points)
    xy = np.empty(2 * starts[-1])
    xy[0::2], xy[1::2] = px, py
    text = _coordinates_text(xy)
    parts = []
    for i in range(num_boxes):
        if crowd[i]:
            counts = rng.integers(1, 400, 40)
            counts[-1] = width * height - counts[:-1].sum()
            segmentation = f'{{"counts":{json.dumps(counts.tolist())},"size":[{height},{width}]}}'
        else:
            segmentation = "[[" + text[14 * starts[i]: 14 * starts[i + 1] - 1].decode() + "]]"
        parts.append(f'{{"segmentation":{segmentation},"area":{w[i] * h[i] * 0.6:.2f},"iscrowd":{int(crowd[i])},'
                     f'"image_id":{owner[i]},"bbox":[{x[i]:.2f},{y[i]:.2f},{w[i]:.2f},{h[i]:.2f}],'
                     f'"category_id":{category[i]},"id":{first_id + i}}}')
    return ("[" + ",\n".join(parts) + "]").encode(), first_id + num_boxes


def _images_json(image_ids: np.ndarray, folder: str, width: int, height: int) -> bytes:
    entries = [f'{{"license":3,"file_name":"{i:012d}.jpg","coco_url":"http://images.cocodataset.org/{folder}/'
               f'{i:012d}.jpg","height":{height},"width":{width},"date_captured":"2013-11-14 11:18:45",'
               f'"flickr_url":"http://farm9.staticflickr.com/8186/{i}_simulated_z.jpg","id":{i}}}'
               for i in image_ids.tolist()]
    return ("[" + ",\n".join(entries) + "]").encode()


def build_simulated_coco(root: Path, sizes: dict[str, int] = COCO_SIZES, seed: int = 0) -> Path:
    """`root`/coco in COCO's layout (train2017/, val2017/, annotations/instances_{train,val}2017.json), built
    unless its marker says it holds these `sizes` already; returns that folder. `root` must be new or one this
    function built."""
    data = root / "coco"
    wanted = {"sizes": dict(sizes), "seed": seed}
    marker = data / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == wanted:
            return data
        raise SystemExit(f"{data} holds a simulated set of other sizes ({marker}): give another --root")
    if root.exists() and any(p.name not in ("coco", "sources", "work") for p in root.iterdir()):
        raise SystemExit(f"--root {root} holds other files: give a new folder (or one this tool built)")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    width, height = sizes["width"], sizes["height"]
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)

    def write_source(index: int) -> Path:
        path = sources / f"{index:05d}.jpg"
        if not path.is_file():
            path.write_bytes(generated_image(seed * 1_000_003 + index, width, height))
        return path

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        source_files = list(pool.map(write_source, range(sizes["unique_images"])))
    ids = rng.choice(np.arange(1, 600_000), size=sizes["train_images"] + sizes["val_images"], replace=False)
    splits = {"train2017": np.sort(ids[: sizes["train_images"]]), "val2017": np.sort(ids[sizes["train_images"]:])}
    (data / "annotations").mkdir(parents=True, exist_ok=True)
    categories = json.dumps([{"supercategory": "thing", "id": c, "name": f"category_{c}"} for c in COCO_CATEGORY_IDS])
    next_id = 1
    for folder, image_ids in splits.items():
        (data / folder).mkdir(exist_ok=True)
        for n, image_id in enumerate(image_ids.tolist()):
            link = data / folder / f"{image_id:012d}.jpg"
            if not link.exists():
                os.link(source_files[n % len(source_files)], link)
        split = folder.removesuffix("2017")
        annotations, next_id = _annotations_json(rng, image_ids, sizes[f"{split}_boxes"], next_id, width, height)
        with open(data / "annotations" / f"instances_{folder}.json", "wb") as f:
            f.write(b'{"info":{"description":"simulated COCO 2017 (tools/benchmark_scale.py)","version":"1.0"},'
                    b'"licenses":[{"url":"http://creativecommons.org/licenses/by/2.0/","id":3,"name":"CC BY"}],'
                    b'"images":' + _images_json(image_ids, folder, width, height) + b',"annotations":' + annotations
                    + b',"categories":' + categories.encode() + b"}")
    marker.write_text(json.dumps(wanted))
    print(f"built the simulated COCO 2017 in {data} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return data


# ------------------------------------------------------------------ what each measuring process reads about itself

def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """RSS, PSS and private memory of a process in MiB (/proc/<pid>/smaps_rollup: PSS splits each shared page
    between its users; private = pages only this process maps: its own allocations and its copy-on-write copies)."""
    values = {"private": 0.0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key.lower()] = int(rest.split()[0]) / 1024
        elif key in ("Private_Clean", "Private_Dirty"):
            values["private"] += int(rest.split()[0]) / 1024
    return values


def peak_rss_mib() -> float:
    """This process's high-water RSS (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


class _Stop(Exception):
    """Ends a measured train_det run where the measurement ends (after iteration 1, after the loader run)."""


def _train_det_command(checkout: Path, data: Path, output_dir: Path) -> list[str]:
    return ["--config", str(checkout / CONFIG.relative_to(ROOT)), f"data.root={data}", "device=cpu", "train.amp=false", "data.num_workers=2",
            f"output_dir={output_dir}"]


def _instrumented_train_det(checkout: Path) -> tuple[Any, dict[str, list[tuple[float, float]]]]:
    """train_det of `checkout`, its stages wrapped to record (start, end) wall times."""
    sys.path[:0] = [str(checkout), str(checkout / "tools")]
    import train_det  # noqa: PLC0415 (the checkout under test, put first on sys.path just above)
    from detection import datasets  # noqa: PLC0415
    spans: dict[str, list[tuple[float, float]]] = {}

    def timed(module: Any, name: str, stage: str) -> None:
        original = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                spans.setdefault(stage, []).append((start, time.time()))
        setattr(module, name, wrapper)

    timed(datasets, "_read_coco_json", "json_read")
    timed(train_det, "load_split", "load_split")
    timed(train_det, "validate_records", "validation")
    timed(train_det, "build_detector", "model_build")
    return train_det, spans


def child_first_iteration(checkout: Path, data: Path, output_dir: Path, launched: float) -> dict[str, Any]:
    """Run train_det to the end of iteration 1; the seconds of each stage since `launched` (the parent's clock
    when it started this process)."""
    train_det, spans = _instrumented_train_det(checkout)
    from engine.loop import TrainingLoop  # noqa: PLC0415
    train_step = TrainingLoop._train_step

    def first_step(self: Any, batch: Any) -> None:
        train_step(self, batch)
        spans["first_step_end"] = [(time.time(), time.time())]
        raise _Stop

    TrainingLoop._train_step = first_step
    data_peak = []
    build_detector = train_det.build_detector

    def after_data(*args: Any, **kwargs: Any) -> Any:  # the data stages are over when the model is built
        data_peak[:] = [peak_rss_mib(), memory_mib()["rss"]]
        return build_detector(*args, **kwargs)

    train_det.build_detector = after_data
    try:
        train_det.main(_train_det_command(checkout, data, output_dir))
    except _Stop:
        pass
    total = lambda stage: sum(end - start for start, end in spans.get(stage, []))  # noqa: E731
    end = spans["first_step_end"][0][1]
    model_end = spans["model_build"][-1][1]
    stages = {"start_up": spans["load_split"][0][0] - launched, "json_read": total("json_read"),
              "records": total("load_split") - total("json_read"), "validation": total("validation"),
              "model_build": total("model_build"), "first_step": end - model_end}
    stages["other"] = end - launched - sum(stages.values())
    return {"seconds": round(end - launched, 2), "stages_s": {k: round(v, 2) for k, v in stages.items()},
            "peak_rss_data_mib": round(data_peak[0], 1), "rss_after_data_mib": round(data_peak[1], 1),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def child_loader_memory(checkout: Path, data: Path, output_dir: Path, iterations: int) -> dict[str, Any]:
    """train_det's set-up, then `iterations` batches of the training loop's own DataLoader (no model step),
    sampling the RSS / PSS of the main process and of each worker every 100 iterations."""
    train_det, _ = _instrumented_train_det(checkout)
    from engine.loop import TrainingLoop  # noqa: PLC0415
    result: dict[str, Any] = {}

    def loader_only(self: Any) -> dict:
        epoch, samples = 0, []
        self.batches.set_epoch(epoch)
        batches = iter(self.loader)
        for iteration in range(1, iterations + 1):
            try:
                next(batches)
            except StopIteration:  # a small --scale: the next epoch, on the same persistent workers
                epoch += 1
                self.batches.set_epoch(epoch)
                batches = iter(self.loader)
                next(batches)
            if iteration % 100 == 0 or iteration == GROWTH_FROM:
                samples.append({"iteration": iteration, "main": memory_mib(),
                                "workers": [memory_mib(w.pid) for w in batches._workers],
                                "load_average": load_average()})
        result.update(samples=samples, peak_rss_mib=round(peak_rss_mib(), 1))
        raise _Stop

    TrainingLoop.run = loader_only
    try:
        train_det.main(_train_det_command(checkout, data, output_dir))
    except _Stop:
        pass
    return result


def child_evaluation(checkout: Path, data: Path, detections: int) -> dict[str, Any]:
    """CocoEvaluator (train_det's default backend) over every val image with `detections` random detections."""
    sys.path.insert(0, str(checkout))
    import torch  # noqa: PLC0415
    from detection.evaluation import CocoEvaluator  # noqa: PLC0415
    annotations = data / "annotations" / "instances_val2017.json"
    start = time.perf_counter()
    evaluator = CocoEvaluator(annotations, COCO_CATEGORY_IDS)
    image_ids = [image["id"] for image in evaluator.coco_gt["images"]]
    generator = torch.Generator().manual_seed(0)
    for image_id in image_ids:
        xy = torch.rand(detections, 2, generator=generator) * torch.tensor([600.0, 440.0])
        wh = torch.rand(detections, 2, generator=generator) * 200 + 4
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([640.0, 480.0]))], dim=1)
        labels = torch.randint(1, len(COCO_CATEGORY_IDS) + 1, (detections,), generator=generator)
        evaluator.update(image_id, boxes, torch.rand(detections, generator=generator), labels)
    updated = time.perf_counter()
    evaluator.compute()
    done = time.perf_counter()
    return {"images": len(image_ids), "detections_per_image": detections, "seconds": round(done - start, 2),
            "update_s": round(updated - start, 2), "compute_s": round(done - updated, 2),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def child_checkpoint(checkout: Path, work: Path) -> dict[str, Any]:
    """Size and save time of train_det's checkpoint of the benchmark's model, with SGD momentum buffers."""
    sys.path.insert(0, str(checkout))
    import torch  # noqa: PLC0415
    from detection.models import build_detector  # noqa: PLC0415
    from engine.checkpoint import save_checkpoint  # noqa: PLC0415
    from engine.config import load_config  # noqa: PLC0415
    from engine.schedule import build_sgd  # noqa: PLC0415
    cfg = load_config(checkout / "configs" / "det" / "default.yaml", checkout / CONFIG.relative_to(ROOT), ["device=cpu"])
    model = build_detector(cfg.model)
    optimizer = build_sgd(model, 0.02, momentum=0.9)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter) if parameter.requires_grad else None
    optimizer.step()  # creates the momentum buffers a real checkpoint holds
    path = work / "checkpoint" / "last.pth"
    start = time.perf_counter()
    save_checkpoint(path, model=model, optimizer=optimizer, epoch=0, iteration=1, config=cfg)
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    path.unlink()
    return {"size_mib": round(size / 2 ** 20, 1), "save_s": round(seconds, 2)}


def child_peer(peer: str, data: Path) -> dict[str, Any]:
    """One peer's json loading of the train split, timed from the call to the dataset object it trains on."""
    annotations, images = data / "annotations" / "instances_train2017.json", data / "train2017"
    start = time.perf_counter()
    if peer == "pycocotools":
        from pycocotools.coco import COCO  # noqa: PLC0415
        size = len(COCO(str(annotations)).imgs)
    elif peer == "torchvision_reference":
        size = len(torchvision_reference_train_set(images, annotations))
    else:
        size = len(detectron2_train_set(images, annotations))
    return {"seconds": round(time.perf_counter() - start, 2), "images": size,
            "peak_rss_mib": round(peak_rss_mib(), 1), "rss_after_mib": round(memory_mib()["rss"], 1)}


# ------------------------------------------------------------------ the peers' json-loading paths

def torchvision_reference_train_set(images: Path, annotations: Path) -> Any:
    """torchvision references/detection/coco_utils.py `get_coco(..., "train")` up to its transforms:
    `torchvision.datasets.CocoDetection` (pycocotools' COCO) + `_coco_remove_images_without_annotations`."""
    import torch  # noqa: PLC0415
    import torchvision  # noqa: PLC0415

    def has_valid_annotation(anno: list[dict]) -> bool:
        return bool(anno) and not all(any(o <= 1 for o in obj["bbox"][2:]) for obj in anno)

    dataset = torchvision.datasets.CocoDetection(str(images), str(annotations))
    ids = [index for index, image_id in enumerate(dataset.ids)
           if has_valid_annotation(dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=image_id, iscrowd=None)))]
    return torch.utils.data.Subset(dataset, ids)


class NumpySerializedList:
    """Detectron2's detectron2/data/common.py NumpySerializedList: every record pickled into one uint8 array
    + end offsets, so forked workers read it without touching Python objects."""

    def __init__(self, items: list) -> None:
        serialized = [np.frombuffer(pickle.dumps(item, protocol=-1), dtype=np.uint8) for item in items]
        self._addr = np.cumsum(np.asarray([len(s) for s in serialized], dtype=np.int64))
        self._lst = np.concatenate(serialized)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, index: int) -> Any:
        start = 0 if index == 0 else int(self._addr[index - 1])
        return pickle.loads(memoryview(self._lst[start:int(self._addr[index])]))


def detectron2_train_set(images: Path, annotations: Path) -> NumpySerializedList:
    """Detectron2's train path (data/datasets/coco.py `load_coco_json`, `filter_images_with_only_crowd_annotations`,
    `DatasetFromList(serialize=True)`), minimal: pycocotools' COCO, one dict per image with its objects (keys
    iscrowd / bbox / category_id / segmentation, contiguous category ids, polygons of < 3 points dropped, crowd
    RLEs compressed), crowd-only images dropped, then serialized."""
    from pycocotools import mask as mask_util  # noqa: PLC0415
    from pycocotools.coco import COCO  # noqa: PLC0415
    coco = COCO(str(annotations))
    id_map = {cat_id: index for index, cat_id in enumerate(sorted(coco.getCatIds()))}
    image_ids = sorted(coco.imgs)
    records = []
    for image, anns in zip(coco.loadImgs(image_ids), (coco.imgToAnns[i] for i in image_ids)):
        objects = []
        for ann in anns:
            obj = {key: ann[key] for key in ("iscrowd", "bbox", "keypoints", "category_id") if key in ann}
            segmentation = ann.get("segmentation")
            if isinstance(segmentation, dict) and isinstance(segmentation["counts"], list):
                segmentation = mask_util.frPyObjects(segmentation, *segmentation["size"])
            elif segmentation:
                segmentation = [poly for poly in segmentation if len(poly) % 2 == 0 and len(poly) >= 6]
                if not segmentation:
                    continue
            obj["segmentation"] = segmentation
            obj["bbox_mode"] = 1  # BoxMode.XYWH_ABS
            obj["category_id"] = id_map[obj["category_id"]]
            objects.append(obj)
        records.append({"file_name": os.path.join(images, image["file_name"]), "height": image["height"],
                        "width": image["width"], "image_id": image["id"], "annotations": objects})
    records = [r for r in records if any(obj.get("iscrowd", 0) == 0 for obj in r["annotations"])]
    return NumpySerializedList(records)


# ------------------------------------------------------------------ the run

def measure(mode: str, env: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """One measurement in a fresh process (this file with --child), with the load average before it."""
    load = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec = {"mode": mode, "out": str(out), "launched": time.time(), **kwargs}
        subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True,
                       env={**os.environ, **(env or {})})
        result = json.loads(out.read_text())
    return {**result, "load_average": {"before": load, "after": load_average()}}


def run_child(spec: dict[str, Any]) -> None:
    checkout, mode = Path(spec.get("checkout", ROOT)), spec["mode"]
    data = Path(spec["data"])
    if mode == "first_iteration":
        result = child_first_iteration(checkout, data, Path(spec["output_dir"]), spec["launched"])
    elif mode == "loader_memory":
        result = child_loader_memory(checkout, data, Path(spec["output_dir"]), spec["iterations"])
    elif mode == "evaluation":
        result = child_evaluation(checkout, data, spec["detections"])
    elif mode == "checkpoint":
        result = child_checkpoint(checkout, Path(spec["work"]))
    else:
        result = child_peer(mode, data)
    Path(spec["out"]).write_text(json.dumps(result))


def worker_growth(samples: list[dict[str, Any]]) -> list[float]:
    """Per worker: least-squares slope of its PSS (MiB) per 1,000 loader iterations, from iteration GROWTH_FROM."""
    late = [s for s in samples if s["iteration"] >= GROWTH_FROM]
    iterations = np.array([s["iteration"] for s in late], dtype=float)
    return [round(float(np.polyfit(iterations, [s["workers"][w]["pss"] for s in late], 1)[0]) * 1000, 3)
            for w in range(len(late[0]["workers"]))]


def git_commit(checkout: Path) -> str:
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return found.stdout.strip() + ("+changes" if dirty else "")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def measure_scale(args: argparse.Namespace) -> dict[str, Any]:
    root, checkout = Path(args.root).expanduser().absolute(), Path(args.checkout).absolute()
    started = time.perf_counter()
    sizes = {key: max(1, round(value * args.scale)) if key.endswith(("images", "boxes")) else value
             for key, value in COCO_SIZES.items()}
    data = build_simulated_coco(root, sizes)
    (root / "work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=root / "work"))
    cache = {"RESDET_CACHE": str(work / "cache")}  # empty: the cold run; the warm run finds what it wrote
    common = {"checkout": str(checkout), "data": str(data)}
    cold = measure("first_iteration", cache, output_dir=str(work / "cold"), **common)
    warm = measure("first_iteration", cache, output_dir=str(work / "warm"), **common)
    loader = measure("loader_memory", cache, output_dir=str(work / "loader"), iterations=args.loader_iters, **common)
    evaluation = measure("evaluation", detections=100, **common)
    checkpoint = measure("checkpoint", work=str(work), **common)
    peers = {peer: measure(peer, data=str(data)) for peer in ("pycocotools", "torchvision_reference", "detectron2")}
    shutil.rmtree(work)
    growth = worker_growth(loader["samples"])
    last = loader["samples"][-1]
    return {
        "first_iteration_s": {"cold": cold["seconds"], "warm": warm["seconds"]},
        "worker_growth_mib_per_1k_iters": max(growth),
        "peak_rss_mib": max(cold["peak_rss_data_mib"], warm["peak_rss_data_mib"]),
        "peak_rss_with_first_step_mib": max(cold["peak_rss_mib"], warm["peak_rss_mib"]),
        "eval_s": evaluation["seconds"],
        "stages_s": {"cold": cold["stages_s"], "warm": warm["stages_s"]},
        "first_iteration": {"cold": cold, "warm": warm},
        "memory": {"worker_growth_mib_per_1k_iters_each": growth, "loader_iterations": args.loader_iters,
                   "steady_main": last["main"], "steady_workers": last["workers"], "samples": loader["samples"],
                   "load_average": loader["load_average"]},
        "evaluation": evaluation,
        "checkpoint": checkpoint,
        "peers": peers,
        "setup": {"checkout": str(checkout), "commit": git_commit(checkout), "config": str(CONFIG.relative_to(ROOT)),
                  "overrides": _train_det_command(ROOT, Path("<data>"), Path("<out>"))[2:-1], "data": str(data),
                  "sizes": sizes, "cpu": cpu_name(), "cpus": os.cpu_count(),
                  "python": platform.python_version(), "total_s": round(time.perf_counter() - started, 1)},
    }


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md's scale section."""
    stages = list(result["stages_s"]["cold"])
    rows = ["| | cold cache | warm cache |", "|---|---:|---:|",
            f"| **time to iteration 1 (s)** | **{result['first_iteration_s']['cold']}** | "
            f"**{result['first_iteration_s']['warm']}** |"]
    rows += [f"| {stage.replace('_', ' ')} | {result['stages_s']['cold'][stage]} | {result['stages_s']['warm'][stage]} |"
             for stage in stages]
    first = result["first_iteration"]
    rows += [f"| peak RSS up to the model build: start-up (MiB) | {first['cold']['peak_rss_data_mib']} | "
             f"{first['warm']['peak_rss_data_mib']} |",
             f"| RSS after the data stages (MiB) | {first['cold']['rss_after_data_mib']} | "
             f"{first['warm']['rss_after_data_mib']} |",
             f"| peak RSS with the first step (MiB) | {first['cold']['peak_rss_mib']} | {first['warm']['peak_rss_mib']} |",
             f"| load average before / after | {first['cold']['load_average']['before']} / "
             f"{first['cold']['load_average']['after']} | {first['warm']['load_average']['before']} / "
             f"{first['warm']['load_average']['after']} |"]
    memory = result["memory"]
    rows += ["", f"| over {memory['loader_iterations']:,} loader iterations | RSS (MiB) | PSS (MiB) | PSS growth after "
             f"{GROWTH_FROM} its (MiB / 1,000 its) |", "|---|---:|---:|---:|",
             f"| main process (end) | {memory['steady_main']['rss']:.0f} | {memory['steady_main']['pss']:.0f} | |"]
    rows += [f"| worker {w} (end) | {m['rss']:.0f} | {m['pss']:.0f} | {g} |"
             for w, (m, g) in enumerate(zip(memory["steady_workers"], memory["worker_growth_mib_per_1k_iters_each"]))]
    rows += ["", "| other figures | value | load average |", "|---|---:|---:|",
             f"| evaluation, 5,000 images x 100 detections (s) | {result['eval_s']} | "
             f"{result['evaluation']['load_average']['before']} |",
             f"| checkpoint size (MiB) / save (s) | {result['checkpoint']['size_mib']} / "
             f"{result['checkpoint']['save_s']} | {result['checkpoint']['load_average']['before']} |"]
    rows += ["", "| json loading of the train split | seconds | peak RSS (MiB) | load average |", "|---|---:|---:|---:|"]
    rows += [f"| {name} | {peer['seconds']} | {peer['peak_rss_mib']:.0f} | {peer['load_average']['before']} |"
             for name, peer in result["peers"].items()]
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="~/scale_coco", help="folder for the simulated COCO and the runs' work files "
                   "(built on the first run; ~600 MB of disk; default ~/scale_coco)")
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    p.add_argument("--markdown", action="store_true", help="print the results as Markdown tables")
    p.add_argument("--checkout", default=str(ROOT), help="the ResDet checkout whose code is measured (default: "
                   "this one; another gives the 'before' figures with the same harness)")
    p.add_argument("--scale", type=float, default=1.0, help="image and box counts x this (1: COCO 2017's; a "
                   "small value checks the tool quickly)")
    p.add_argument("--loader-iters", type=int, default=LOADER_ITERS, help="loader iterations of the memory run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out and not Path(args.out).absolute().parent.is_dir():
        p.error(f"--out {args.out}: folder {Path(args.out).absolute().parent} does not exist")
    if args.loader_iters <= GROWTH_FROM + 1000:
        p.error(f"--loader-iters must be > {GROWTH_FROM + 1000} (growth is measured after iteration {GROWTH_FROM})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return None
    result = measure_scale(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(markdown(result) if args.markdown else text)
    return result


if __name__ == "__main__":
    main()
