"""Draw a checkpoint's predicted masks (VOC palette) next to the val images, to see what the mIoU hides.

    python tools/visualize_seg.py --config outputs/seg_default/config.yaml \
        --checkpoint outputs/seg_default/last.pth --out outputs/seg_default/vis --num 8 --gt

Writes one PNG per image: [image | prediction overlay], plus a ground-truth overlay panel with --gt.
Inference uses the config's eval.scales / eval.flip, as tools/test_seg.py does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from datafiles.images import image_to_tensor  # noqa: E402
from engine.config import config_or_exit  # noqa: E402
from engine.trained import build_trained_model  # noqa: E402
from segmentation.build import DEFAULT_CONFIG, build_dataset, check_classes, prepare_synthetic  # noqa: E402
from segmentation.evaluation import multiscale_flip_inference  # noqa: E402
from segmentation.models import build_segmentation_model  # noqa: E402
from segmentation.palette import overlay  # noqa: E402

GAP = 4  # white pixels between panels


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the run's config.yaml (or any seg config)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="last.pth written by tools/train_seg.py")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--num", type=int, default=8, help="how many val images (from the start of the split)")
    parser.add_argument("--gt", action="store_true", help="add a ground-truth overlay panel")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    cfg = config_or_exit(parser, DEFAULT_CONFIG, args)
    device = torch.device(cfg.device)

    prepare_synthetic(cfg.data)
    val_set = build_dataset(cfg.data, "val")
    check_classes(cfg.model.num_classes, val_set)
    model = build_trained_model(build_segmentation_model, cfg.model, args.checkpoint).to(device).eval()

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(min(args.num, len(val_set))):
        image, mask = val_set.load_sample(index)
        batch = image_to_tensor(image)[None].to(device)
        pred = multiscale_flip_inference(model, batch, tuple(cfg.eval.scales), cfg.eval.flip).argmax(1)[0].cpu().numpy()
        panels = [image, overlay(image, pred)] + ([overlay(image, mask)] if args.gt else [])
        gap = np.full((image.shape[0], GAP, 3), 255, dtype=np.uint8)
        row = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)
        path = args.out / f"{val_set.samples[index][0].stem}.png"
        Image.fromarray(row).save(path)
        written.append(path)
    print(f"{len(written)} images written to {args.out}")
    return written


if __name__ == "__main__":
    main()
