"""Training checkpoints that are safe to write (atomic) and safe to read (``weights_only``).

Only tensors and plain Python containers are stored, so loading never unpickles arbitrary
objects and a crash mid-save never leaves a truncated ``last.pth`` behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

LAST_CHECKPOINT = "last.pth"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel, so keys have no ``module.``."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, parallel) else model


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int,
    iteration: int,
    config: Mapping | DictConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the training state to ``path`` atomically (temp file in the same dir + os.replace).

    ``config`` (dict or DictConfig) and ``extra`` must hold only tensors and plain Python values,
    or the file will not load with ``weights_only=True``.
    """
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "iteration": int(iteration),
        "config": dict(config) if config is not None else None,
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore whatever objects are given and return the raw dict (epoch, iteration, extras)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if model is not None:
        unwrap_model(model).load_state_dict(state["model"])
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is not None and state.get(name) is not None:
            target.load_state_dict(state[name])
    return state


def find_resume(output_dir: str | Path) -> Path | None:
    """``output_dir/last.pth`` if a previous run left one, else None."""
    path = Path(output_dir) / LAST_CHECKPOINT
    return path if path.is_file() else None


def resume(output_dir: str | Path, **objects: Any) -> dict[str, Any]:
    """`--resume`: restore ``output_dir/last.pth`` into the given model / optimizer / scheduler / scaler.

    A missing checkpoint is an error naming the folder, not a silent fresh start."""
    path = find_resume(output_dir)
    if path is None:
        raise FileNotFoundError(f"--resume: no {LAST_CHECKPOINT} in {output_dir}")
    state = load_checkpoint(path, **objects)
    print(f"resumed from {path} at epoch {state['epoch']}, iteration {state['iteration']}")
    return state
