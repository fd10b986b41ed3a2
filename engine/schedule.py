"""Per-iteration learning-rate schedules, SGD with weight-decay groups, and the one optimizer step of every tool.

Detection recipes schedule in iterations (warm-up, then step decay at fixed iterations), so the scheduler is a
single LambdaLR stepped once per iteration rather than per epoch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

POLICIES = ("step", "cosine", "poly", "constant")
POLY_POWER = 0.9  # DeepLab's "poly" schedule: lr * (1 - it / total) ** 0.9
# module types whose parameters (scale and shift) count as normalisation parameters for weight decay
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    policy: str = "step",
    steps: Sequence[float | int] = (),
    gamma: float = 0.1,
) -> LambdaLR:
    """Linear warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, times the decay ``policy``.

    ``step``: multiply by ``gamma`` at each milestone in ``steps``: all fractions of ``total_iters`` (0 < s < 1)
    or all iteration numbers (integers >= 1), never a mix; ``cosine``: to 0 at ``total_iters``; ``poly``:
    ``(1 - it / total_iters) ** 0.9``; ``constant``.
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown lr policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    decay = _decay(policy, total_iters, milestones(steps, total_iters) if policy == "step" else [], gamma)

    def factor(iteration: int) -> float:
        if iteration < warmup_iters:
            alpha = iteration / warmup_iters
            return (warmup_factor * (1 - alpha) + alpha) * decay(iteration)
        return decay(iteration)

    return LambdaLR(optimizer, factor)


def milestones(steps: Sequence[float | int], total_iters: int) -> list[int]:
    """`train.lr_steps` as sorted iteration numbers; a mix of fractions and iterations is an error."""
    steps = list(steps)
    fractions = [s for s in steps if 0 < s < 1]
    iterations = [s for s in steps if s >= 1 and float(s).is_integer()]
    if fractions and iterations or len(fractions) + len(iterations) != len(steps):
        raise ValueError(f"lr_steps {steps} must be all fractions of the run (0 < s < 1) or all iteration "
                         "numbers (integers >= 1)")
    return sorted(round(s * total_iters) for s in fractions) or sorted(int(s) for s in iterations)


def _decay(policy: str, total_iters: int, steps: list[int], gamma: float) -> Callable[[int], float]:
    if policy == "cosine":
        return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / total_iters))
    if policy == "poly":
        return lambda it: (1 - min(it, total_iters) / total_iters) ** POLY_POWER
    if policy == "step":
        return lambda it: gamma ** bisect.bisect_right(steps, it)
    return lambda it: 1.0


def build_sgd(
    model: nn.Module,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    norm_weight_decay: float | None = 0.0,
    bias_weight_decay: float | None = 0.0,
) -> torch.optim.SGD:
    """SGD over the trainable parameters with up to three weight-decay groups.

    Normalisation scales and shifts get ``norm_weight_decay``, the other biases ``bias_weight_decay``, every
    other weight ``weight_decay``; ``None`` means ``weight_decay`` (the paper decays every parameter).
    """
    groups = weight_decay_groups(model, weight_decay, norm_weight_decay, bias_weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def weight_decay_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None,
                        bias_weight_decay: float | None) -> list[dict]:
    """Param groups by kind. Hand-written: timm's `param_groups_weight_decay` puts norm parameters and biases
    in one group (by ndim), torchvision's `split_normalization_params` is private and ignores biases."""
    decay_of = {"norm": weight_decay if norm_weight_decay is None else norm_weight_decay,
                "bias": weight_decay if bias_weight_decay is None else bias_weight_decay,
                "weight": weight_decay}
    params: dict[str, list[nn.Parameter]] = {"weight": [], "norm": [], "bias": []}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                kind = "norm" if isinstance(module, NORM_TYPES) else "bias" if name == "bias" else "weight"
                params[kind].append(param)
    return [{"params": params[kind], "weight_decay": decay_of[kind]} for kind in params if params[kind]]


def step_optimizer(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                   scaler: torch.amp.GradScaler, *, iteration: int, clip_grad_norm: float | None = None) -> None:
    """One SGD iteration shared by the training tools: finite-loss check, (AMP-scaled) backward,
    optional gradient clipping, optimizer and per-iteration LR step."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
