"""Draw detections (or the ground truth) onto validation images -> PNG files.

    python tools/visualize_det.py --config outputs/det_default/config.yaml \
        --checkpoint outputs/det_default/last.pth --out outputs/det_default/vis --num 8
    python tools/visualize_det.py --config configs/det/coco128.yaml --gt --out outputs/coco128_gt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detection.build import DEFAULT_CONFIG, build_dataset, load_split, prepare_synthetic  # noqa: E402
from detection.datasets import read_image  # noqa: E402
from detection.fast import optimize_for_inference  # noqa: E402
from detection.inference import to_original_size  # noqa: E402
from detection.models import build_detector  # noqa: E402
from engine.config import config_or_exit  # noqa: E402
from engine.trained import build_trained_model  # noqa: E402


def draw(image_rgb: torch.Tensor, boxes: torch.Tensor, labels: list[str], colour: str) -> torch.Tensor:
    """uint8 [3,H,W] image with labelled boxes (torchvision's drawing utility)."""
    return draw_bounding_boxes(image_rgb, boxes, labels=labels, colors=colour, width=2)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="model to draw predictions of (omit with --gt)")
    parser.add_argument("--gt", action="store_true", help="draw the ground truth instead of predictions")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--num", type=int, default=8, help="number of validation images (>= 1)")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--no-fast", action="store_true", help="run the model as trained (BN unfolded, NCHW) instead "
                                                               "of the faster equivalent form (detection.fast)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if not args.gt and args.checkpoint is None:
        parser.error("give --checkpoint (predictions) or --gt (ground truth)")
    if args.num < 1:
        parser.error(f"--num must be at least 1, got {args.num}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    cfg = config_or_exit(parser, DEFAULT_CONFIG, args)

    prepare_synthetic(cfg.data)  # the built-in demo data, if the config uses it (no-op once written)
    records, class_names, _ = load_split(cfg.data, "val")
    records = records[: args.num]
    dataset = build_dataset(cfg.data, records, train=False)
    model = None
    if not args.gt:
        model = build_trained_model(build_detector, cfg.model, args.checkpoint).eval()
        if not args.no_fast:
            optimize_for_inference(model)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, record in enumerate(records):
        original = torch.from_numpy(read_image(record.path)).permute(2, 0, 1).contiguous()
        if model is None:
            boxes, labels, scores = torch.from_numpy(record.boxes), torch.from_numpy(record.labels), None
        else:
            image, target = dataset[index]
            with torch.no_grad():
                output = model([image])[0]
            keep = output["scores"] >= args.score_thresh
            boxes = to_original_size(output["boxes"][keep], image, target["orig_size"])
            labels, scores = output["labels"][keep], output["scores"][keep]
        names = [class_names[int(label) - 1] + ("" if scores is None else f" {float(s):.2f}")
                 for label, s in zip(labels, scores if scores is not None else labels)]
        drawn = draw(original, boxes, names, "lime" if model is None else "orange")
        path = args.out / f"{Path(record.path).stem}.png"
        write_png(drawn, str(path))
        written.append(path)
    print(f"wrote {len(written)} images to {args.out}")
    return written


if __name__ == "__main__":
    main()
