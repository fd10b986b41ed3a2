"""The detection data pipeline as tools/benchmark_data.py measures it: ResDet's training path and torchvision's
detection reference (train.py --use-v2, plus the resize its model does) over the same JPEGs in the same order,
timed in alternating rounds, ours split into stages, and (`profile`) the alternatives for decoding, float
conversion and resizing checked bit for bit against ours. The tool's docstring gives the method."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.transforms import v2

from datafiles.images import READ_FLAGS, image_to_tensor, read_image
from detection.datasets import DetectionDataset, ImageRecord, collate, load_coco_records
from detection.transforms import build_det_transforms
from engine.random_state import isolated_rng
from engine.sampling import EpochBatches, SeededDataset

from .benchmarking import cpu_model, timed

STAGES = ("decode_to_rgb", "resize", "flip", "boxes_and_albumentations", "seeding", "to_float", "collate")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # unused by resize, needed to build


class TorchvisionReference(Dataset):
    """One sample as torchvision's detection reference (train.py --use-v2, PIL backend) makes it, plus the
    resize its model does first (GeneralizedRCNNTransform, in training mode)."""

    def __init__(self, records: Sequence[ImageRecord], min_size: int, max_size: int, flip_prob: float,
                 model_resize: bool = True) -> None:
        self.records = list(records)
        self.model_resize = model_resize
        self.transforms = v2.Compose([
            v2.RandomHorizontalFlip(p=flip_prob), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY), v2.SanitizeBoundingBoxes(),
            v2.ToPureTensor()])
        self.model_transform = GeneralizedRCNNTransform(min_size, max_size, IMAGENET_MEAN, IMAGENET_STD).train()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        record = self.records[index]
        image = Image.open(record.path).convert("RGB")
        keep = ~record.ignore
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(record.boxes[keep]), format="XYXY",
                                                    canvas_size=(record.height, record.width)),
                  "labels": torch.from_numpy(record.labels[keep]), "image_id": record.image_id}
        image, target = self.transforms(image, target)
        return self.model_transform.resize(image, target) if self.model_resize else (image, target)


def torchvision_collate(batch: Sequence[Any]) -> tuple:
    """references/detection/utils.py collate_fn."""
    return tuple(zip(*batch))


def batch_keys(dataset: Dataset, batch_size: int, seed: int) -> list[list[tuple[int, int]]]:
    """Epoch 0's `(index, seed)` batches, as the training loop draws them."""
    batches = EpochBatches(dataset, seed=seed, batch_size=batch_size)
    batches.set_epoch(0)
    return list(batches)


def stage_times(dataset: DetectionDataset, keys: list[list[tuple[int, int]]]) -> dict[str, float]:
    """Seconds per stage of ours over one pass, each stage made of the calls the real path makes. The
    albumentations call less its resize and flip (redone alone to time them) is its box bookkeeping and per-call
    overhead: a difference of timings, which noise can push below zero on tiny images."""
    transform, sums = dataset.transform, dict.fromkeys(STAGES, 0.0)
    resize_step = transform.transforms[0]
    for batch in keys:
        samples = []
        for index, seed in batch:
            record = dataset.records[index]
            keep = ~record.ignore
            t0 = time.perf_counter()
            with isolated_rng(seed):
                transform.set_random_seed(seed)
                t1 = time.perf_counter()
                rgb = cv2.imread(record.path, READ_FLAGS)
                t3 = time.perf_counter()
                out = transform(image=rgb, bboxes=record.boxes[keep], labels=record.labels[keep])
                t4 = time.perf_counter()
            t4_exit = time.perf_counter()
            # the resize and flip the albumentations call just made, redone alone to time them
            scale = min(max(resize_step.max_size) / min(rgb.shape[:2]), resize_step.longest / max(rgb.shape[:2]))
            size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
            t5 = time.perf_counter()
            resized = cv2.resize(rgb, size, interpolation=resize_step.interpolation)
            t6 = time.perf_counter()
            flipped = not np.array_equal(out["image"][:, 0], resized[:, 0])
            t7 = time.perf_counter()
            if flipped:
                cv2.flip(resized, 1)
            t8 = time.perf_counter()
            samples.append((image_to_tensor(out["image"]), {"boxes": out["bboxes"]}))
            t9 = time.perf_counter()
            sums["seeding"] += (t1 - t0) + (t4_exit - t4)
            sums["decode_to_rgb"] += t3 - t1
            sums["resize"] += t6 - t5
            sums["flip"] += t8 - t7
            sums["boxes_and_albumentations"] += (t4 - t3) - (t6 - t5) - (t8 - t7)
            sums["to_float"] += t9 - t8
        t10 = time.perf_counter()
        collate(samples)
        sums["collate"] += time.perf_counter() - t10
    return sums


# --profile: the alternatives for the stages that can change without changing a single output bit, or that differ
# between the two pipelines (resize); "(ours)" marks what ResDet runs, "(before)" what it ran before this tool.
DECODERS: dict[str, Callable[[str], np.ndarray]] = {
    "cv2.imread BGR + cvtColor (before)": lambda path: cv2.cvtColor(
        cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION), cv2.COLOR_BGR2RGB),
    "cv2.imread IMREAD_COLOR_RGB (ours)": read_image,
    "PIL open + convert('RGB') (torchvision)": lambda path: np.asarray(Image.open(path).convert("RGB")),
}  # torchvision.io's decoders are deprecated since 0.29 (superseded by TorchCodec): left out
TO_FLOAT: dict[str, Callable[[np.ndarray], torch.Tensor]] = {
    "transposed uint8 copy + .float().div_(255) (before)": lambda image: torch.from_numpy(
        np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255),
    "cv2.split + np.divide per plane (ours)": image_to_tensor,
    "permute + .float().div_(255) + .contiguous()": lambda image: torch.from_numpy(image).permute(2, 0, 1)
    .float().div_(255).contiguous(),
    "numpy astype of the transposed view (non-contiguous result)": lambda image: torch.from_numpy(
        image.transpose(2, 0, 1).astype(np.float32)).div_(255),
}


def _each(function: Callable, inputs: Iterable) -> None:
    for x in inputs:
        function(x)  # each output freed before the next is made, as in a loader


def interleaved(variants: dict[str, Callable], inputs: list, rounds: int) -> dict[str, float]:
    """Median ms per input of each variant, the variants alternating order round by round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(timed(lambda: _each(variants[name], inputs))[1] * 1000 / len(inputs))
    return {name: statistics.median(ms) for name, ms in times.items()}


def profile(records: Sequence[ImageRecord], transform: Callable, min_size: int, max_size: int,
            rounds: int) -> dict[str, dict[str, dict[str, Any]]]:
    """ms/image of each alternative for decoding, float conversion and resizing, and whether it gives ours' bits."""
    paths = [r.path for r in records]
    decoded = [read_image(path) for path in paths]
    augmented = [transform(image=image, bboxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))["image"]
                 for image in decoded]
    model_transform = GeneralizedRCNNTransform(min_size, max_size, IMAGENET_MEAN, IMAGENET_STD).train()
    small_floats = [image_to_tensor(image) for image in decoded]
    resize_step = transform.transforms[0]
    resizers = {"cv2.resize of uint8 HWC, bilinear (ours)": lambda i: resize_step(image=decoded[i])["image"],
                "interpolate of float CHW, bilinear (torchvision)": lambda i: model_transform.resize(small_floats[i])}
    groups = {"decode": (DECODERS, paths, lambda f: all(np.array_equal(f(p), d) for p, d in zip(paths, decoded))),
              "to_float": (TO_FLOAT, augmented,
                           lambda f: all(torch.equal(f(a), image_to_tensor(a)) for a in augmented)),
              "resize": (resizers, list(range(len(records))), None)}
    result = {}
    for group, (variants, inputs, same) in groups.items():
        ms = interleaved(variants, inputs, rounds)
        result[group] = {name: {"ms_per_image": ms[name], **({"same_bits_as_ours": same(f)} if same else {})}
                         for name, f in variants.items()}
    return result


def output_shapes(loader: DataLoader) -> list[tuple[int, ...]]:
    return [tuple(image.shape) for images, _ in loader for image in images]


def hardware() -> dict[str, Any]:
    return {"cpu": cpu_model() or platform.processor() or platform.machine(), "cores": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "opencv": cv2.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def measure_pipelines(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    data = Path(args.data)
    records, _, _ = load_coco_records(data / args.images, data / args.annotations)
    records = sorted(records, key=lambda r: r.image_id)[:args.limit or None]
    ours_set = DetectionDataset(records, build_det_transforms(True, [args.min_size], args.max_size, args.flip_prob))
    keys = batch_keys(ours_set, args.batch_size, args.seed)
    ours = DataLoader(SeededDataset(ours_set), batch_sampler=keys, collate_fn=collate, num_workers=0)
    indices = [[index for index, _ in batch] for batch in keys]
    theirs, theirs_unresized = (
        DataLoader(TorchvisionReference(records, args.min_size, args.max_size, args.flip_prob, model_resize=resize),
                   batch_sampler=indices, collate_fn=torchvision_collate, num_workers=0) for resize in (True, False))
    passes = {"ours": lambda: _each(lambda batch: None, ours), "torchvision": lambda: _each(lambda batch: None, theirs),
              "torchvision_without_model_resize": lambda: _each(lambda batch: None, theirs_unresized),
              "stages": lambda: stage_times(ours_set, keys)}
    for run_pass in passes.values():  # warm-up: file cache, allocator, lazy imports
        run_pass()
    sides = ("ours", "torchvision", "torchvision_without_model_resize")
    times: dict[str, list[float]] = {name: [] for name in sides}
    stages: list[dict[str, float]] = []
    load_before = os.getloadavg()
    for round_ in range(args.rounds):
        for name in sides if round_ % 2 == 0 else sides[::-1]:
            times[name].append(timed(passes[name])[1])
        stages.append(passes["stages"]())
    n = len(records)
    ours_shapes, their_shapes = output_shapes(ours), output_shapes(theirs)
    result: dict[str, Any] = {
        name: {"images_per_s": n / statistics.median(seconds), "ms_per_image": 1000 * statistics.median(seconds) / n,
               "round_seconds": seconds}
        for name, seconds in times.items()}
    result["ratio"] = result["ours"]["images_per_s"] / result["torchvision"]["images_per_s"]
    result["ratio_per_round"] = [t / o for o, t in zip(times["ours"], times["torchvision"])]
    result["ratio_to_torchvision_without_model_resize"] = (result["ours"]["images_per_s"]
                                                          / result["torchvision_without_model_resize"]["images_per_s"])
    result["ours"]["stages_ms_per_image"] = {stage: 1000 * statistics.median(s[stage] for s in stages) / n
                                             for stage in STAGES}
    result["shapes"] = {"images": n, "same_shape": sum(a == b for a, b in zip(ours_shapes, their_shapes)),
                        "max_side_difference_px": max(max(abs(x - y) for x, y in zip(a, b))
                                                      for a, b in zip(ours_shapes, their_shapes)),
                        "ours_pixels": sum(int(np.prod(s)) for s in ours_shapes),
                        "torchvision_pixels": sum(int(np.prod(s)) for s in their_shapes)}
    if args.profile:
        result["profile"] = profile(records, ours_set.transform, args.min_size, args.max_size, args.rounds)
    result["settings"] = {"data": str(data), "images": args.images, "annotations": args.annotations, "num_images": n,
                          "min_size": args.min_size, "max_size": args.max_size, "flip_prob": args.flip_prob,
                          "batch_size": args.batch_size, "rounds": args.rounds, "threads": args.threads,
                          "seed": args.seed, "num_workers": 0}
    result["hardware"] = {**hardware(), "load_average_at_start": list(load_before)}
    return result
