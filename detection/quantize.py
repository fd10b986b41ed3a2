"""int8 post-training quantisation of a detector's dense parts for CPU inference (PyTorch's x86 backend, FX mode).

Backbone + FPN, the RPN's 3x3 conv and the box head's fc layers are dense arithmetic at the FP32 ceiling; in int8
(fbgemm / oneDNN u8 x s8 kernels) they run about twice as fast. RoIAlign, the RPN's 1x1 outputs, the class / box
predictor and NMS stay in float.
The weights are quantised per output channel; each activation gets one scale, set from a histogram of its
values over a few calibration images (the training images the model was fitted to). Not exact: the AP it
costs is measured on trained models in docs/benchmarks.md, so measure it on yours with `test_det.py --int8`.

FX graph mode is deprecated in favour of `torchao` (not in the pinned environment) but ships with torch 2.14;
PyTorch's own API does the work here: tracing, conv + ReLU / add + ReLU fusion, observers, kernels.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torchvision.models.detection import FasterRCNN

from backbones import fold_batchnorm

from .build import build_dataset, load_split
from .fast import to_channels_last

BACKEND = "x86"
# The dense arithmetic of a forward: backbone + FPN, the RPN's 3x3 conv (run on every level), the box head's
# fc layers (on every proposal). The RPN's 1x1 outputs, the class / box predictor and everything between stay float.
INT8_PARTS = ("backbone", "rpn.head.conv", "roi_heads.box_head")


def quantize_int8(model: FasterRCNN, calibration: Iterable[list[Tensor]]) -> FasterRCNN:
    """`model` (CPU) in eval mode with BN folded, channels_last, and its dense parts (`INT8_PARTS` that it has)
    in int8, calibrated by running the whole model on `calibration`: batches as the model takes them (lists of
    [3, H, W] images in [0, 1])."""
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"int8 needs torch's {BACKEND!r} quantized engine; this build has "
                           f"{torch.backends.quantized.supported_engines}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 quantisation runs on the CPU: move the model there first")
    torch.backends.quantized.engine = BACKEND
    fold_batchnorm(model.eval())
    modules = dict(model.named_modules())
    parts = [path for path in INT8_PARTS if path in modules]
    with warnings.catch_warnings():  # the FX API's deprecation notice (see the module docstring)
        warnings.filterwarnings("ignore", module=r"torch\.ao\.")
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")  # attributed to this module
        for path in parts:  # observers in place of each part
            graph = _without_identities(fx.symbolic_trace(model.get_submodule(path)))
            model.set_submodule(path, prepare_fx(graph, get_default_qconfig_mapping(BACKEND), example_inputs=()))
        seen = 0
        with torch.no_grad():
            for images in calibration:
                model(images)
                seen += len(images)
        if not seen:
            raise ValueError("int8 calibration needs at least one image")
        for path in parts:
            model.set_submodule(path, convert_fx(model.get_submodule(path)))
    return to_channels_last(model)


def calibration_batches(data: Mapping[str, Any], num_images: int, batch_size: int) -> Iterator[list[Tensor]]:
    """The first `num_images` training images of the data config at test size (the distribution the model was
    fitted to; no augmentation), `batch_size` at a time."""
    records, _, _ = load_split(data, "train")
    dataset = build_dataset(data, records[:num_images], train=False)
    for start in range(0, len(dataset), batch_size):
        yield [dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))]


def _without_identities(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Drop the `nn.Identity` calls that folded BNs leave between a conv and its ReLU, so conv + ReLU fuse."""
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module
