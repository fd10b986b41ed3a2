"""Draw detections (the Predictor's, as predict.py gives them) or the ground truth onto validation images -> PNG files.

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

from detection.build import DEFAULT_CONFIG, load_split, prepare_synthetic  # noqa: E402
from detection.datasets import read_image  # noqa: E402
from detection.predictor import Predictor  # noqa: E402
from engine.config import config_or_exit  # noqa: E402


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
    predictor = None if args.gt else Predictor(cfg, args.checkpoint, score_thresh=args.score_thresh,
                                                fast=not args.no_fast)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        image = read_image(record.path)
        if predictor is None:
            drawn = draw_bounding_boxes(torch.from_numpy(image).permute(2, 0, 1), torch.tensor(record.boxes),
                                        labels=[class_names[label - 1] for label in record.labels.tolist()],
                                        colors="lime", width=2).permute(1, 2, 0).numpy()
        else:
            drawn = predictor(image).drawn_on(image, args.score_thresh)
        path = args.out / f"{Path(record.path).stem}.png"
        write_png(torch.from_numpy(drawn).permute(2, 0, 1).contiguous(), str(path))
        written.append(path)
    print(f"wrote {len(written)} images to {args.out}")
    return written


if __name__ == "__main__":
    main()
