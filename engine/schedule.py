"""Per-iteration learning-rate schedules and the SGD setup used by all training tools.

Detection recipes schedule in iterations (warmup, then step decay at fixed iterations), so the
scheduler is a single LambdaLR stepped once per iteration rather than per epoch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchvision.ops._utils import split_normalization_params

POLICIES = ("step", "cosine", "constant")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    policy: str = "step",
    steps: Sequence[float | int] = (),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from ``warmup_factor`` to 1 over ``warmup_iters``, times the decay ``policy``.

    ``step``: multiply by ``gamma`` at each milestone in ``steps`` (fractions of ``total_iters``
    if all < 1, else iteration numbers); ``cosine``: to 0 at ``total_iters``; ``constant``.
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown lr policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if total_iters <= 0:
        raise ValueError(f"total_iters must be positive, got {total_iters}")
    decay = _decay(policy, total_iters, steps, gamma)

    def factor(iteration: int) -> float:
        if iteration < warmup_iters:
            alpha = iteration / warmup_iters
            return (warmup_factor * (1 - alpha) + alpha) * decay(iteration)
        return decay(iteration)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _decay(
    policy: str, total_iters: int, steps: Sequence[float | int], gamma: float
) -> Callable[[int], float]:
    if policy == "cosine":
        return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total_iters) / total_iters))
    if policy == "step":
        fractions = all(s < 1 for s in steps)
        milestones = sorted(round(s * total_iters) if fractions else int(s) for s in steps)
        return lambda it: gamma ** bisect.bisect_right(milestones, it)
    return lambda it: 1.0


def build_sgd(
    params_or_model: nn.Module | Iterable[torch.Tensor],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    norm_weight_decay: float | None = 0.0,
) -> torch.optim.SGD:
    """SGD over trainable params; for a model, norm-layer and bias params get ``norm_weight_decay``.

    BN scales and biases add little capacity, so the usual recipe exempts them from decay.
    ``norm_weight_decay=None`` (or a plain param iterable) applies ``weight_decay`` everywhere.
    """
    if isinstance(params_or_model, nn.Module):
        if norm_weight_decay is not None:
            groups = _decay_groups(params_or_model, weight_decay, norm_weight_decay)
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        params_or_model = params_or_model.parameters()
    params = [p for p in params_or_model if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _decay_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Two param groups: regular weights, and norm-layer params plus all biases."""
    norm_params, other_params = split_normalization_params(model)  # trainable params only
    biases = {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    decayed = [p for p in other_params if id(p) not in biases]
    undecayed = norm_params + [p for p in other_params if id(p) in biases]
    groups = [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": norm_weight_decay},
    ]
    return [group for group in groups if group["params"]]


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
