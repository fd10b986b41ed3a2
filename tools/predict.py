"""Run a trained detection or segmentation model on your own images: COCO-format predictions + drawings.

    python tools/predict.py --config outputs/det_default/config.yaml --checkpoint outputs/det_default/last.pth \\
        --input photos/ more/*.jpg one.png --out outputs/det_default/predictions
    # the images of a COCO json (their image_ids kept), e.g. to score predictions.json with pycocotools:
    python tools/predict.py --config RUN/config.yaml --checkpoint RUN/last.pth --input .cache/shapes/val \\
        --annotations .cache/shapes/annotations/instances_val.json --score-thresh 0.05

Inputs are files, folders (their images, recursively) or glob patterns. The task (detection or segmentation)
comes from the config. Writes to --out (default: predictions/ beside the checkpoint):
  predictions.json  COCO results: detection {image_id, category_id, bbox [x, y, w, h], score};
                    segmentation {image_id, category_id, segmentation (RLE), score (mean confidence)},
                    background left out; category_id as in the data's categories (COCO ids; VOC 1..K)
  images.json       the COCO "images" entries (id, file_name, width, height) the image_ids refer to
  rendered/         each image with its boxes, class names and scores (or its mask overlay)
  masks/            segmentation only: class-index palette PNGs at the original size
  unreadable.txt    inputs that could not be read, with the reason (the run goes on; exit status 1)
An --out that already holds a predictions.json is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detection import Predictor as DetectionPredictor  # noqa: E402
from detection.build import DEFAULT_CONFIG as DET_DEFAULT  # noqa: E402
from engine.config import ConfigError, load_task_config  # noqa: E402
from engine.images import DatasetError, as_rgb_array  # noqa: E402
from segmentation import Predictor as SegmentationPredictor  # noqa: E402
from segmentation.palette import overlay, save_palette_png  # noqa: E402
from segmentation.build import DEFAULT_CONFIG as SEG_DEFAULT  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
GLOB_CHARS = set("*?[")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the run's config.yaml")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the run's last.pth")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders or glob patterns (with --annotations: the image folder)")
    parser.add_argument("--annotations", type=Path, help="COCO json: predict its images, keep their image_ids")
    parser.add_argument("--out", type=Path, help="output folder (default: predictions/ beside the checkpoint)")
    parser.add_argument("--score-thresh", type=float, help="detection: keep scores >= T (default: the run's "
                                                           "model.roi.score_thresh)")
    parser.add_argument("--batch-size", type=int, default=None, help="detection: images per forward pass "
                                                                     "(default: the run's eval.batch_size)")
    parser.add_argument("--render-thresh", type=float, default=0.5, help="detection: draw boxes scoring >= this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="detection: also compile backbone + FPN (pays off "
                                                               "on many images of few sizes)")
    parser.add_argument("--int8", type=int, default=0, metavar="N", help="detection, CPU: run the dense parts in int8, "
                        "calibrated on the first N training images of the run's data (e.g. 32); not exact")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier predictions.json in --out")
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.parent / "predictions"
    if (out / "predictions.json").exists() and not args.overwrite:
        parser.error(f"{out} already holds predictions.json from an earlier run: pass --overwrite or another --out")
    try:
        task, cfg = load_task_config(args.config, {"detection": DET_DEFAULT, "segmentation": SEG_DEFAULT})
    except (ConfigError, FileNotFoundError) as error:
        parser.error(str(error))

    images, missing = (annotated_images(args.annotations, args.input) if args.annotations
                       else numbered_images(expand_inputs(args.input)))
    if not images and not missing:
        parser.error(f"no images found in {args.input}")
    if task == "detection":
        predictor = DetectionPredictor(cfg, args.checkpoint, device=args.device, score_thresh=args.score_thresh,
                                       compile=args.compile, int8=args.int8)
    else:
        if args.score_thresh is not None:
            print("--score-thresh applies to detection runs only; ignored", file=sys.stderr)
        predictor = SegmentationPredictor(cfg, args.checkpoint, device=args.device)
    batch_size = 1 if task == "segmentation" else args.batch_size or cfg.eval.batch_size

    out.mkdir(parents=True, exist_ok=True)
    (out / "rendered").mkdir(exist_ok=True)
    if task == "segmentation":
        (out / "masks").mkdir(exist_ok=True)
    predictions, entries, unreadable = [], [], list(missing)
    names = OutputNames()
    progress = tqdm(total=len(images), desc="predict", unit="img", dynamic_ncols=True)
    for batch in batches(images, batch_size):
        loaded = []
        for image_id, path in batch:
            try:
                loaded.append((image_id, path, as_rgb_array(path)))
            except DatasetError as error:
                unreadable.append(str(error))  # names the file
        arrays = [array for _, _, array in loaded]
        results = [] if not arrays else predictor(arrays, batch_size) if task == "detection" else predictor(arrays)
        for (image_id, path, array), result in zip(loaded, results):
            entries.append({"id": image_id, "file_name": str(path), "width": array.shape[1], "height": array.shape[0]})
            stem = names.unique(path)
            if task == "detection":
                predictions += detection_results(image_id, result)
                Image.fromarray(draw_detections(array, result, args.render_thresh)).save(
                    out / "rendered" / f"{stem}.jpg", quality=92)
            else:
                predictions += segmentation_results(image_id, result)
                Image.fromarray(overlay(array, result.mask)).save(out / "rendered" / f"{stem}.jpg", quality=92)
                save_palette_png(out / "masks" / f"{stem}.png", result.mask)
        progress.update(len(batch))
    progress.close()

    (out / "predictions.json").write_text(json.dumps(predictions) + "\n")
    (out / "images.json").write_text(json.dumps(entries, indent=1) + "\n")
    stale = out / "unreadable.txt"
    if unreadable:
        stale.write_text("\n".join(unreadable) + "\n")
        print(f"{len(unreadable)} input(s) could not be read, listed in {stale}:", file=sys.stderr)
        print("\n".join(f"  {line}" for line in unreadable[:10]), file=sys.stderr)
    elif stale.exists():
        stale.unlink()  # from the run this one overwrites
    print(f"{task}: {len(entries)} images, {len(predictions)} predictions written to {out}")
    return {"task": task, "out": out, "images": len(entries), "predictions": len(predictions),
            "unreadable": unreadable}


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given, folders' images (recursively, sorted), glob patterns' matches (sorted). A path that is
    neither is kept, so it is reported as unreadable rather than silently dropped."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif not path.exists() and GLOB_CHARS & set(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            paths += [p for p in matches if p.is_file()] or [path]
        else:
            paths.append(path)
    return list(dict.fromkeys(paths))  # a file named twice is predicted once


def numbered_images(paths: list[Path]) -> tuple[list[tuple[int, Path]], list[str]]:
    return list(enumerate(paths, start=1)), []


def annotated_images(annotations: Path, folders: Sequence[str]) -> tuple[list[tuple[int, Path]], list[str]]:
    """(image_id, path) of every image in a COCO json, found under the first --input folder that has it;
    images found nowhere are returned as unreadable lines."""
    data = json.loads(annotations.read_text())
    found, missing = [], []
    for image in data["images"]:
        candidates = [Path(folder) / image["file_name"] for folder in folders]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{image['file_name']} (image id {image['id']}): not found in {list(folders)}")
        else:
            found.append((int(image["id"]), path))
    return found, missing


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


class OutputNames:
    """File stems for rendered images, unique even when inputs from different folders share a name."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def unique(self, path: Path) -> str:
        stem, k = path.stem, 1
        while stem in self.used:
            stem, k = f"{path.stem}_{k}", k + 1
        self.used.add(stem)
        return stem


def draw_detections(array: np.ndarray, detections, threshold: float) -> np.ndarray:
    """The image with the boxes scoring >= threshold, labelled "name score" (torchvision's drawing utility)."""
    keep = np.flatnonzero(detections.scores >= threshold)
    if not len(keep):
        return array
    drawn = draw_bounding_boxes(torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(detections.boxes[keep]),
                                labels=[f"{detections.names[i]} {detections.scores[i]:.2f}" for i in keep],
                                colors="orange", width=2)
    return drawn.permute(1, 2, 0).numpy()


def detection_results(image_id: int, detections) -> list[dict]:
    xywh = box_convert(torch.from_numpy(detections.boxes).double(), "xyxy", "xywh").tolist()
    # full precision: rounding would reorder near-tied scores and move AP off the run's own evaluation
    return [{"image_id": image_id, "category_id": int(c), "bbox": box, "score": float(s)}
            for box, s, c in zip(xywh, detections.scores, detections.category_ids)]


def segmentation_results(image_id: int, segmentation) -> list[dict]:
    """One RLE per predicted class (background, index 0, left out), as COCO's stuff-segmentation results."""
    results = []
    for index in np.unique(segmentation.mask).tolist():
        if index == 0:
            continue
        region = segmentation.mask == index
        rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": image_id, "category_id": segmentation.category_ids[index], "segmentation": rle,
                        "score": round(float(segmentation.confidence[region].mean()), 5)})
    return results


if __name__ == "__main__":
    sys.exit(1 if main()["unreadable"] else 0)
