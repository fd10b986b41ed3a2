"""Multi-level RoIAlign whose backward on the CPU is one sparse matrix product per level.

torchvision's CPU RoIAlign backward runs on one thread and recomputes the bilinear weights for every channel:
at 512 px it is about a fifth of a Faster R-CNN FPN training step on 2 cores (docs/benchmarks.md). RoIAlign is
linear in the features, `out = S @ F` with S the (bins x pixels) matrix of bilinear weights (16 a bin for
sampling_ratio 2), so its backward is `S^T @ grad`: a CSR product that torch runs multi-threaded (MKL).

The forward is torchvision's own `MultiScaleRoIAlign`, so outputs and losses are unchanged bit for bit; the
gradients equal torchvision's up to float rounding (the sum runs in another order; tests check float64).
Written by hand: neither torchvision nor another library ships a faster CPU RoIAlign backward.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchvision import ops
from torchvision.ops._utils import convert_boxes_to_roi_format


class MultiScaleRoIAlign(ops.MultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign` (same arguments, same state) with the sparse backward on the CPU."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if _needs_cpu_backward(features):
            return _SparseBackward.apply(self, boxes, image_shapes, *features)
        return super().forward(x, boxes, image_shapes)


def _needs_cpu_backward(features: list[Tensor]) -> bool:
    """A gradient will flow to CPU features, eagerly (exports and compiled graphs keep torchvision's op)."""
    return (features[0].device.type == "cpu" and torch.is_grad_enabled() and any(f.requires_grad for f in features)
            and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()))


class _SparseBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pooler: MultiScaleRoIAlign, boxes: list[Tensor], image_shapes: list[tuple[int, int]],
                *features: Tensor) -> Tensor:
        out = ops.MultiScaleRoIAlign.forward(pooler, dict(zip(pooler.featmap_names, features)), boxes, image_shapes)
        rois = convert_boxes_to_roi_format(boxes)
        levels = pooler.map_levels(boxes)  # all 0 with one level
        ctx.save_for_backward(rois, levels)
        ctx.scales, ctx.shapes = list(pooler.scales), [f.shape for f in features]
        ctx.output_size, ctx.sampling_ratio = tuple(pooler.output_size), pooler.sampling_ratio
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple:
        rois, levels = ctx.saved_tensors
        grads = []
        for level, (shape, scale) in enumerate(zip(ctx.shapes, ctx.scales)):
            idx = torch.where(levels == level)[0]
            if idx.numel() == 0:
                grads.append(grad_out.new_zeros(shape))
                continue
            grads.append(roi_align_backward(grad_out[idx], rois[idx], shape, scale, ctx.output_size, ctx.sampling_ratio))
        return (None, None, None, *grads)


def roi_align_backward(grad_out: Tensor, rois: Tensor, input_shape: torch.Size, spatial_scale: float,
                       output_size: tuple[int, int], sampling_ratio: int) -> Tensor:
    """The gradient of `torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio,
    aligned=False)` w.r.t. `input` of `input_shape` (N, C, H, W), for `grad_out` of shape (K, C, PH, PW).
    A bf16 / fp16 gradient (autocast) is computed in float32 and cast back, as torchvision's autocast RoIAlign
    does (MKL has no low-precision sparse product, and low-precision tap weights would move the samples)."""
    if grad_out.dtype in (torch.bfloat16, torch.float16):
        return roi_align_backward(grad_out.float(), rois, input_shape, spatial_scale, output_size,
                                  sampling_ratio).to(grad_out.dtype)
    n, c, height, width = input_shape
    cols, weights = _bilinear_taps(rois.to(grad_out.dtype), spatial_scale, height, width, output_size, sampling_ratio)
    # S^T in CSR: rows = input pixels, so each output row is summed by one thread in a fixed order (deterministic)
    num_bins, cols, weights = cols.shape[0], cols.flatten(), weights.flatten()
    order = torch.argsort(cols.int() if n * height * width < 2**31 else cols, stable=True)  # int32 sorts faster
    bin_of_tap = torch.div(order, cols.numel() // num_bins, rounding_mode="floor")
    crow = torch.zeros(n * height * width + 1, dtype=torch.int64, device=cols.device)
    crow[1:] = torch.cumsum(torch.bincount(cols, minlength=n * height * width), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        s_t = torch.sparse_csr_tensor(crow, bin_of_tap, weights[order], (n * height * width, num_bins),
                                      check_invariants=False)  # valid by construction
    grad_bins = grad_out.permute(0, 2, 3, 1).reshape(-1, c)  # (K * PH * PW, C): one row per bin
    with torch.autocast(grad_out.device.type, enabled=False):  # a backward run inside autocast stays in float32
        grad = (s_t @ grad_bins).view(n, height, width, c)
    return grad.permute(0, 3, 1, 2).contiguous()


def _bilinear_taps(rois: Tensor, spatial_scale: float, height: int, width: int, output_size: tuple[int, int],
                   sampling_ratio: int) -> tuple[Tensor, Tensor]:
    """For every output bin (K * PH * PW rows, in (roi, ph, pw) order): the flat input pixel index
    (batch * H * W + y * W + x) of each bilinear tap and its weight, divided by the bin's sample count.
    Taps of samples outside the map, and the padding of RoIs with a smaller adaptive grid, weigh 0.
    This mirrors torchvision's CPU kernel (roi_align_kernel.cpp, aligned=False) step by step."""
    pooled_h, pooled_w = output_size
    batch = rois[:, 0].long()
    start_w, start_h = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
    roi_w = torch.clamp(rois[:, 3] * spatial_scale - start_w, min=1.0)
    roi_h = torch.clamp(rois[:, 4] * spatial_scale - start_h, min=1.0)
    bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.int64)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.int64)
    else:  # adaptive: ceil(roi size / pooled size) samples a bin side
        grid_h, grid_w = torch.ceil(roi_h / pooled_h).long(), torch.ceil(roi_w / pooled_w).long()
    count = (grid_h * grid_w).clamp(min=1).to(rois.dtype)
    y_taps, y_weights = _axis_taps(start_h, bin_h, grid_h, pooled_h, height)  # (K, PH, GH, 2) each
    x_taps, x_weights = _axis_taps(start_w, bin_w, grid_w, pooled_w, width)  # (K, PW, GW, 2) each
    k, gh, gw = len(rois), y_taps.shape[2], x_taps.shape[2]
    # (K, PH, PW, GH, GW, 2, 2): every (y tap, x tap) pair of every sample of every bin
    cols = (batch.view(k, 1, 1, 1, 1, 1, 1) * (height * width)
            + y_taps.view(k, pooled_h, 1, gh, 1, 2, 1) * width + x_taps.view(k, 1, pooled_w, 1, gw, 1, 2))
    weights = (y_weights.view(k, pooled_h, 1, gh, 1, 2, 1) * x_weights.view(k, 1, pooled_w, 1, gw, 1, 2)
               / count.view(k, 1, 1, 1, 1, 1, 1))
    return cols.reshape(k * pooled_h * pooled_w, -1), weights.reshape(k * pooled_h * pooled_w, -1)


def _axis_taps(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int) -> tuple[Tensor, Tensor]:
    """Along one axis: the low / high pixel index of each sample's bilinear taps and their weights (hy, ly),
    zero for samples outside [-1, size] and for grid positions beyond a RoI's own grid."""
    g = int(grid.max())
    p = torch.arange(pooled, dtype=start.dtype, device=start.device).view(1, pooled, 1)
    i = torch.arange(g, device=start.device).view(1, 1, g)
    step = bin_size.view(-1, 1, 1)
    pos = start.view(-1, 1, 1) + p * step + (i.to(start.dtype) + 0.5) * step / grid.view(-1, 1, 1).to(start.dtype)
    inside = (pos >= -1.0) & (pos <= size) & (i < grid.view(-1, 1, 1))
    pos = pos.clamp(min=0)
    low = pos.long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    taps = torch.stack([low, high], dim=-1).clamp(min=0)  # outside samples: any valid index, weight 0
    weights = torch.stack([1.0 - frac, frac], dim=-1) * inside.unsqueeze(-1)
    return taps, weights
