"""Export a trained detector: ONNX or TorchScript (the whole model), or the backbone alone via torch.export.

    python tools/export.py --config RUN/config.yaml --checkpoint RUN/last.pth --format onnx --out RUN/model.onnx
    python tools/export.py --config RUN/config.yaml --checkpoint RUN/last.pth --format torchscript --out RUN/model.ts
    python tools/export.py --config RUN/config.yaml --checkpoint RUN/last.pth --format torch_export --backbone-only \\
        --out RUN/backbone.pt2
    # another test size, checked on every image of a folder:
    python tools/export.py --config RUN/config.yaml --checkpoint RUN/last.pth --format onnx --out RUN/model_256.onnx \\
        data.min_size=[256] data.max_size=384 --check-images ../shared/data/raccoon/JPEGImages

Whole model (onnx, torchscript): input "image" float32 RGB [3, H, W] in 0..1, any H, W, taken at 8 bits
(round(x * 255)); the run's test resize (the Predictor's, bit for bit: its output size for every input size,
OpenCV's fixed-point bilinear), normalisation and NMS happen inside; outputs
"boxes" [N, 4] (x0, y0, x1, y1 in the input's pixels), "scores" [N], "labels" [N] (1..K, the order of the data's
categories). BatchNorms are folded into the convolutions. Single-scale: a config's eval.scales / eval.flip
(test-time augmentation) are not in the export (the tool says so). key=value overrides apply to the run's config.
Backbone only (torch_export): input RGB [N, 3, H, W] in 0..1, H and W multiples of 32 and >= 64; output
{stage: features}; load with torch.export.load(FILE).module().

Then the exported file runs on real images against detection.Predictor, the path predict.py and test_det.py take
(single-scale): --check-images (files or folders), or the first --check-count of the run's val split (default 4;
0: all of it), each at its size and at 3/4 of it (an OpenCV uint8 resize: both sides get the same pixels; the
export gets them as float32 / 255). An image passes when every detection scoring >= 0.3 on either side has one of
the same label scoring >= 0.25 within 1 px on the other (room for float rounding in
the network; with the same resized pixels the boxes agree to ~1e-3 px). Any image that does not pass fails the
tool (exit status 1) with the images named. The backbone: features within 1e-4 of PyTorch's.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from datafiles.images import DatasetError, read_image  # noqa: E402
from detection.build import DEFAULT_CONFIG, load_split  # noqa: E402
from detection.export import (NormalizedBackbone, build_exportable_detector, export_backbone, export_onnx,  # noqa: E402
                              export_torchscript)
from detection.export_check import (ExportCheckFailed, check_backbone, check_detector, onnx_runner,  # noqa: E402
                                    single_scale_predictor)
from engine.config import config_or_exit  # noqa: E402

FORMATS = ("onnx", "torchscript", "torch_export")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the run's config.yaml")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the run's last.pth")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the file to write")
    parser.add_argument("--backbone-only", action="store_true", help="export the backbone (needs --format torch_export)")
    parser.add_argument("--check-images", nargs="+", type=Path, help="image files or folders to check the export on "
                                                                      "(default: the run's val split, see --check-count)")
    parser.add_argument("--check-count", type=int, default=4, metavar="N",
                        help="without --check-images: check the first N images of the run's val split (0: all)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 11)")
    parser.add_argument("--score-thresh", type=float, help="bake a different score threshold into the export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the run's config, e.g. "
                                                                           "data.min_size=[256] data.max_size=384")
    args = parser.parse_args(argv)
    if (args.format == "torch_export") != args.backbone_only:
        parser.error("--backbone-only goes with --format torch_export (and only with it): torch.export cannot follow "
                     "the detector's data-dependent proposal filtering and NMS; use onnx or torchscript for the whole model")
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists: pass --overwrite or another --out")
    if args.check_count < 0:
        parser.error(f"--check-count must be >= 0, got {args.check_count}")
    cfg = config_or_exit(parser, DEFAULT_CONFIG, args)
    try:
        images = check_images(args.check_images, cfg, args.check_count)
    except (DatasetError, FileNotFoundError) as error:
        parser.error(f"cannot read the check images: {error}")
    if not images:
        parser.error("no images to check the export on: pass --check-images")

    module = build_exportable_detector(cfg, args.checkpoint)
    if args.score_thresh is not None:
        module.model.roi_heads.score_thresh = args.score_thresh
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings about Python-side constants that torchvision expects
        if args.format == "onnx":
            export_onnx(module, args.out, args.opset)
            run = onnx_runner(args.out)
        elif args.format == "torchscript":
            export_torchscript(module, args.out)
            run = torch.jit.load(str(args.out))
        else:
            backbone = NormalizedBackbone(module.model).eval()
            export_backbone(backbone, args.out)
            return check_backbone(backbone, torch.export.load(str(args.out)).module(), images, args.out)
    return check_detector(single_scale_predictor(cfg, args.checkpoint, args.score_thresh), run, images, args.out,
                          args.format, exported_module=module)


def check_images(paths: list[Path] | None, cfg: DictConfig, count: int) -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8 RGB) of the given files / folders' images, or of the first `count` (0: all) images of
    the run's val split, decoded as the datasets decode."""
    if paths is None:
        records = load_split(cfg.data, "val")[0]
        files = [Path(r.path) for r in (records[:count] if count else records)]
    else:
        for path in paths:
            if not path.exists():
                hint = " (key=value overrides go before --check-images, which takes every argument after it)"
                raise FileNotFoundError(f"--check-images {path}: no such file or folder{hint if '=' in str(path) else ''}")
        files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p])
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    return [(str(f), read_image(f)) for f in files]


if __name__ == "__main__":
    try:
        main()
    except ExportCheckFailed as error:
        sys.exit(f"EXPORT CHECK FAILED: {error}")
