"""Per-image inference latency of our DeepLabV3-R50 vs torchvision's `deeplabv3_resnet50`, one run.

    python tools/benchmark_seg.py --size 512 --iters 5 --threads 2 --out docs/benchmark_seg.json

Both models carry the same (randomly initialised) weights, see the same normalised image, and must give
the same logits before anything is reported. Ours normalises inside; torchvision's is fed the normalised
tensor, so both do the same work. Output stride 8 with the aux head, torchvision's configuration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from experiments.benchmarking import timed_calls  # noqa: E402
from segmentation.models import build_segmentation_model  # noqa: E402


def build_models(num_classes: int = 21) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=True).eval()
    ours = build_segmentation_model({"head": "deeplabv3", "num_classes": num_classes, "output_stride": 8,
                                     "aux_loss": True, "backbone": {"name": "resnet50"}}).eval()
    ours.load_state_dict(reference.state_dict())
    return ours, reference


@torch.no_grad()
def latency_ms(model: torch.nn.Module, image: torch.Tensor, warmup: int, iters: int) -> float:
    """Median wall time of `iters` forward passes after `warmup` untimed ones."""
    return statistics.median(1000 * seconds for seconds in timed_calls(lambda: model(image), warmup, iters))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    ours, reference = build_models()
    image = torch.rand(1, 3, args.size, args.size)
    normalised = ours.backbone.preprocessing.normalize(image)
    with torch.no_grad():
        difference = (ours(image)["out"] - reference(normalised)["out"]).abs().max().item()
    if difference > 1e-4:
        raise AssertionError(f"our DeepLabV3 and torchvision's disagree by {difference}: not the same work")
    results = {
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "max_logit_difference": difference,
        "torchvision_ms": latency_ms(reference, normalised, args.warmup, args.iters),
        "ours_ms": latency_ms(ours, image, args.warmup, args.iters),
    }
    results["speedup"] = results["torchvision_ms"] / results["ours_ms"]
    print(f"DeepLabV3-R50, {args.size}x{args.size}, {args.threads} thread(s): torchvision "
          f"{results['torchvision_ms']:.0f} ms/image, ours {results['ours_ms']:.0f} ms/image "
          f"({results['speedup']:.2f}x); logits equal within {difference:.1e}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
