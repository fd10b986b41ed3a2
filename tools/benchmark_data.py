"""Detection data pipeline throughput per worker: ResDet's training path against torchvision's reference.

    python tools/benchmark_data.py --markdown                         # coco128 train96, 800/1333, flip 0.5
    python tools/benchmark_data.py --rounds 7 --out docs/benchmark_data.json --markdown

Both sides turn the same JPEGs, in the same order, into the float32 [3, H, W] images in [0, 1] a Faster R-CNN
gets (before its normalisation), at the COCO recipe: shortest side 800 capped at 1333 on the longest, horizontal
flip with p=0.5, batches of 2, in one process with one thread (a DataLoader with num_workers=0: "per worker").

- ours: `DetectionDataset` + `build_det_transforms(True, [800], 1333)` wrapped in `SeededDataset`, batches of
  `(index, seed)` keys from `EpochBatches` and `detection.datasets.collate`: exactly what `train_det` runs.
- torchvision: references/detection/train.py with `--use-v2` (PIL backend, data augmentation "hflip"):
  `Image.open(path).convert("RGB")`, then v2 `RandomHorizontalFlip(0.5)`, `ToImage()` (PILToTensor as a
  tv_tensors.Image), `ToDtype(float32, scale=True)`, `ConvertBoundingBoxFormat(XYXY)`,
  `SanitizeBoundingBoxes()`, `ToPureTensor()` on the image and its `tv_tensors.BoundingBoxes`, collated by
  `tuple(zip(*batch))`, plus the resize torchvision does inside the model, counted here so both sides do the
  same work: `GeneralizedRCNNTransform(800, 1333, ...).resize` (bilinear `interpolate` of the float tensor).
  Its targets come from the same pre-parsed records (torchvision's COCO wrapper would parse the json
  annotations per sample: a cost left out in its favour).

Also timed: torchvision's loader alone ("torchvision_without_model_resize"), which is what its DataLoader
workers do when the model, on the GPU, resizes.

Rounds alternate the sides (in reversed order every other round) and the reported images/s is the median
round, so a busy machine slows both alike. A per-stage split of ours (decode straight to RGB, resize, flip,
albumentations' box bookkeeping, per-sample seeding, to-float, collate) is timed in the same rounds; `--profile`
adds the alternatives for decoding, float conversion and resizing, each checked bit for bit against ours.
torchvision sizes with floor(side * scale), ours with round(): an output side may differ by one pixel, so the
JSON counts the images whose two outputs have the same shape.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from experiments.data_benchmark import measure_pipelines  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "coco128"


def to_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"{s['num_images']} images, shortest side {s['min_size']} (max {s['max_size']}), flip p={s['flip_prob']}, "
             f"batch {s['batch_size']}, {s['threads']} thread, median of {s['rounds']} alternating rounds",
             "", "| pipeline (one worker) | images/s | ms/image |", "|---|---:|---:|"]
    labels = {"ours": "ours (ResDet training path)", "torchvision": "torchvision reference + its model-side resize",
              "torchvision_without_model_resize": "torchvision reference, loader only (resize left to the model)"}
    for name, label in labels.items():
        lines.append(f"| {label} | {result[name]['images_per_s']:.1f} | {result[name]['ms_per_image']:.2f} |")
    lines += [f"| **ratio ours / torchvision (both resize)** | **{result['ratio']:.2f}x** | |",
              f"| ratio ours / torchvision loader only | {result['ratio_to_torchvision_without_model_resize']:.2f}x"
              " | |",
              "", "| stage of ours | ms/image |", "|---|---:|"]
    stages = result["ours"]["stages_ms_per_image"]
    lines += [f"| {stage} | {ms:.2f} |" for stage, ms in stages.items()]
    rest = result["ours"]["ms_per_image"] - sum(stages.values())
    lines.append(f"| rest (DataLoader, SeededDataset, targets) | {rest:.2f} |")
    shapes = result["shapes"]
    lines += ["", f"Same output shape on {shapes['same_shape']} of {shapes['images']} images (torchvision floors the "
              f"scaled side, ours rounds it: at most {shapes['max_side_difference_px']} px apart)."]
    for group, variants in result.get("profile", {}).items():
        lines += ["", f"| {group} alternative | ms/image | same bits as ours |", "|---|---:|:---:|"]
        same = {True: "yes", False: "no", None: "-"}
        lines += [f"| {name} | {v['ms_per_image']:.2f} | {same[v.get('same_bits_as_ours')]} |"
                  for name, v in variants.items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="COCO-style folder (default ../shared/data/coco128)")
    p.add_argument("--images", default="train2017", help="image folder inside --data")
    p.add_argument("--annotations", default="annotations/instances_train96.json", help="json inside --data")
    p.add_argument("--limit", type=int, default=0, help="use the first N images by id (0: all)")
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--flip-prob", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="timed passes over the images, per side")
    p.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (one worker: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also time the alternatives for decoding, float conversion and resizing (ms/image)")
    p.add_argument("--out", default="", help="write the results as JSON to this file")
    p.add_argument("--markdown", action="store_true", help="print the results as Markdown tables")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = measure_pipelines(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        print(to_markdown(result))
    else:
        print(json.dumps({k: result[k] for k in ("ours", "torchvision", "ratio")}, indent=1))
    return result


if __name__ == "__main__":
    main()
