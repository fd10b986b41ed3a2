"""What tools/benchmark_scale.py measures train_det with at COCO 2017's size: the simulated COCO 2017 it builds,
the measurements each fresh process makes (time to iteration 1 by stage, the loader's memory, evaluation, a
checkpoint's size and save time, the peers' json loading) and the memory figures a process reads of itself.

It imports nothing of the project at module level: the measured checkout (this one or an older one, `--checkout`)
is put first on sys.path inside each measuring process before its train_det, engine and detection are imported,
so one harness measures any checkout."""
from __future__ import annotations

import json
import os
import pickle
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                     31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                     56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                     85, 86, 87, 88, 89, 90)
"""COCO 2017's 80 category ids (1..90 with gaps)."""
COCO_SIZES = {"train_images": 118_287, "train_boxes": 860_001, "val_images": 5_000, "val_boxes": 36_781,
              "unique_images": 2_000, "width": 640, "height": 480}
MARKER = "SIMULATED_COCO.json"
CONFIG = Path("configs/det/r50_fpn_coco.yaml")  # in the measured checkout
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


def train_det_command(checkout: Path, data: Path, output_dir: Path) -> list[str]:
    return ["--config", str(checkout / CONFIG), f"data.root={data}", "device=cpu", "train.amp=false", "data.num_workers=2",
            f"output_dir={output_dir}"]


def instrumented_train_det(checkout: Path) -> tuple[Any, dict[str, list[tuple[float, float]]]]:
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
    train_det, spans = instrumented_train_det(checkout)
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
        train_det.main(train_det_command(checkout, data, output_dir))
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
    train_det, _ = instrumented_train_det(checkout)
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
        train_det.main(train_det_command(checkout, data, output_dir))
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
    cfg = load_config(checkout / "configs" / "det" / "default.yaml", checkout / CONFIG, ["device=cpu"])
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


def run_child(spec: dict[str, Any]) -> None:
    """One measurement, in the process the tool started for it; the result goes to spec["out"] as JSON. The
    peers' measurements (no "checkout" in `spec`) run no ResDet code."""
    checkout, mode = Path(spec.get("checkout", "")), spec["mode"]
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
