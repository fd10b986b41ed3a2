"""A first look at a backbone: stages, channels, strides, parameters and multiply-adds.

    python tools/backbone_info.py resnet50 --stride-in-1x1
    python tools/backbone_info.py vgg16 timm:convnext_tiny --size 512 --output-stride 16
"""
from __future__ import annotations

import argparse

import torch

from backbones import build_backbone, count_macs, count_parameters
from backbones.build import RESNETS


def stage_table(name: str, size: int, **options) -> str:
    """Markdown table: one row per stage (cumulative cost up to that stage) plus the classifier."""
    backbone = build_backbone(name, **options)
    stages = list(backbone.stage_specs)
    sizes = output_sizes(backbone, size)
    rows = [f"### {name} {options or ''}  (input {size}x{size})", "",
            "| stage | channels | stride | output size | params (M, cumulative) | GMACs (cumulative) |",
            "|---|---:|---:|---:|---:|---:|"]
    for stage in stages:
        backbone.set_out_features([stage])
        spec = backbone.stage_specs[stage]
        used = sum(p.numel() for path in _modules_up_to(backbone, stage) for p in backbone.get_submodule(path).parameters())
        # timm's feature wrapper always runs every stage, so only its total is meaningful
        macs = "" if name.startswith("timm:") else f"{count_macs(backbone, (size, size)) / 1e9:.2f}"
        rows.append(f"| {stage} | {spec.channels} | {spec.stride} | {sizes[stage]} | {used / 1e6:.2f} | {macs} |")
    if name.startswith("timm:"):
        rows.append(f"| all stages | | | | {count_parameters(backbone) / 1e6:.2f} | "
                    f"{count_macs(backbone, (size, size)) / 1e9:.2f} |")
        return "\n".join(rows)
    with_head = build_backbone(name, num_classes=1000, out_features=["logits"], **options)
    rows.append(f"| + 1000-way classifier | | | | {count_parameters(with_head) / 1e6:.2f} | "
                f"{count_macs(with_head, (size, size)) / 1e9:.2f} |")
    return "\n".join(rows)


def output_sizes(backbone, size: int) -> dict[str, str]:
    """Each stage's output size from a forward pass (rounding follows the convolutions and pools, which
    `size // stride` does not); ValueError when the input is too small for the net."""
    backbone.set_out_features(list(backbone.stage_specs))
    try:
        outputs = backbone.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError as err:
        raise ValueError(f"input {size}x{size} is too small for this backbone ({str(err).splitlines()[0]})") from None
    return {name: "x".join(map(str, out.shape[-2:])) if out.shape[-2] != out.shape[-1] else str(out.shape[-1])
            for name, out in outputs.items()}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _modules_up_to(backbone, stage: str) -> list[str]:
    names = list(backbone.stage_specs)
    return [path for name in names[: names.index(stage) + 1] for path in backbone.stage_modules[name]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", help="backbone names, e.g. resnet50 plain34 vgg16 timm:resnet50d")
    parser.add_argument("--size", type=positive_int, default=224, help="square input size (default 224, as Table 1)")
    parser.add_argument("--stride-in-1x1", action="store_true", help="paper/Caffe-style bottlenecks (ResNet-50+)")
    parser.add_argument("--output-stride", type=int, default=32, choices=(32, 16, 8))
    parser.add_argument("--shortcut", default="B", choices=("A", "B", "C"))
    args = parser.parse_intermixed_args(argv)
    for name in args.names:
        options = {}
        if name in RESNETS and args.shortcut != "B":
            options["shortcut"] = args.shortcut
        if name in RESNETS and args.stride_in_1x1:
            options["stride_in_1x1"] = True
        if args.output_stride != 32:
            options["output_stride"] = args.output_stride
        try:
            with torch.no_grad():  # callers (tests, notebooks) keep their own grad mode
                print(stage_table(name, args.size, **options), end="\n\n")
        except ValueError as err:
            parser.error(f"{name}: {err}")


if __name__ == "__main__":
    main()
