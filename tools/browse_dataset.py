"""See the data as the model sees it: the first N training (or val) samples after the run's transforms, drawn
into a page (boxes with class names for detection, palette masks for segmentation), with the class counts.

    python tools/browse_dataset.py --config configs/det/raccoon.yaml --num 24 --out outputs/browse_raccoon
    python tools/browse_dataset.py --config configs/seg/coco128_voc.yaml --split val --num 8
    python tools/browse_dataset.py --config outputs/det_default/config.yaml data.flip_prob=1.0   # any key=value

The task is told from the config (engine.config.load_task_config, as tools/predict.py does). Open DIR/index.html in a browser (no network
needed). A wrong class list, swapped box coordinates or a broken augmentation show here before a GPU-day is spent.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detection.build import prepare_synthetic as prepare_detection_demo  # noqa: E402
from detection.build import DEFAULT_CONFIG as DET_DEFAULT  # noqa: E402
from detection.report import write_detection_browse  # noqa: E402
from engine.config import ConfigError, config_or_exit, load_task_config  # noqa: E402
from segmentation.build import prepare_synthetic as prepare_segmentation_demo  # noqa: E402
from segmentation.build import DEFAULT_CONFIG as SEG_DEFAULT  # noqa: E402
from segmentation.report import write_segmentation_browse  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="a detection or segmentation config")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--num", type=int, default=16, help="samples to draw (>= 1, default 16)")
    parser.add_argument("--out", type=Path, help="folder of the page (default: outputs/browse_<config>_<split>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be at least 1, got {args.num}")
    try:
        task, _ = load_task_config(args.config, {"detection": DET_DEFAULT, "segmentation": SEG_DEFAULT})
    except (ConfigError, FileNotFoundError) as error:
        parser.error(str(error))
    detection = task == "detection"
    cfg = config_or_exit(parser, DET_DEFAULT if detection else SEG_DEFAULT, args)
    out = args.out or Path("outputs") / f"browse_{args.config.stem}_{args.split}"

    (prepare_detection_demo if detection else prepare_segmentation_demo)(cfg.data)  # demo data, if configured
    write = write_detection_browse if detection else write_segmentation_browse
    page = write(out, cfg=cfg, split=args.split, num=args.num, config_path=args.config)
    print(f"{task} {args.split} samples: {page}")
    return page


if __name__ == "__main__":
    main()
