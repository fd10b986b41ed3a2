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
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from datafiles.images import DatasetError, annotated_images, as_rgb_array, expand_inputs  # noqa: E402
from detection import Predictor as DetectionPredictor  # noqa: E402
from detection.build import DEFAULT_CONFIG as DET_DEFAULT  # noqa: E402
from engine.config import ConfigError, load_task_config  # noqa: E402
from segmentation import Predictor as SegmentationPredictor  # noqa: E402
from segmentation.build import DEFAULT_CONFIG as SEG_DEFAULT  # noqa: E402
from segmentation.palette import overlay, save_palette_png  # noqa: E402

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
            predictions += result.to_coco(image_id)
            if task == "detection":
                Image.fromarray(result.drawn_on(array, args.render_thresh)).save(
                    out / "rendered" / f"{stem}.jpg", quality=92)
            else:
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


def numbered_images(paths: list[Path]) -> tuple[list[tuple[int, Path]], list[str]]:
    return list(enumerate(paths, start=1)), []


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


if __name__ == "__main__":
    sys.exit(1 if main()["unreadable"] else 0)
