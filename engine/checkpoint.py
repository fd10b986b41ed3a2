"""Training checkpoints that are safe to write (atomic) and safe to read (``weights_only``), and the rules for
starting a run in a folder that may hold one (new run, ``--resume``, ``--overwrite``, ``--eval-only``).

Only tensors and plain Python containers are stored, so loading never unpickles arbitrary
objects and a crash mid-save never leaves a truncated ``last.pth`` behind.
"""

from __future__ import annotations

import os
import shutil
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



# Keys a resumed run may change: they lengthen the run or touch evaluation, logging and loading speed only.
SAFE_RESUME_CHANGES = ("train.epochs", "train.iters", "train.log_every", "train.checkpoint_every", "eval.",
                       "data.num_workers", "data.val_limit", "output_dir")
WORK_FILES = (LAST_CHECKPOINT, "history.jsonl", "metrics.json")  # a folder holding one of these holds a run
RUN_FILES = (*WORK_FILES, "config.yaml", "resumes.jsonl", "eval_metrics.json", "invalid_train.txt",
             "invalid_val.txt", "tb", "report", "eval_metrics_report")  # what --overwrite deletes


def start_run(output_dir: str | Path, config: Mapping | DictConfig, *, resume: bool = False,
              overwrite: bool = False, eval_only: bool = False) -> dict[str, Any] | None:
    """Check `output_dir` before anything is written, and return the checkpoint to continue from (or None).

    A new run never lands on an earlier one: a folder holding a run is an error unless `resume` (the saved
    config must agree on everything but SAFE_RESUME_CHANGES) or `overwrite` (the earlier run's files are
    deleted). `eval_only` needs a checkpoint. Stray temporaries of a save that was killed are removed.
    """
    output_dir = Path(output_dir)
    path = output_dir / LAST_CHECKPOINT
    if resume and overwrite:
        raise ValueError("--resume continues the run in output_dir, --overwrite deletes it: choose one")
    if eval_only or resume:
        if not path.is_file():
            flag = "--eval-only" if eval_only else "--resume"
            raise FileNotFoundError(f"{flag}: no {LAST_CHECKPOINT} in {output_dir}; train first, or point "
                                    "output_dir at a finished run")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if resume:
            changed = config_changes(state.get("config") or {}, config)
            refused = {key: change for key, change in changed.items() if not key.startswith(SAFE_RESUME_CHANGES)}
            if refused:
                lines = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in sorted(refused.items()))
                raise ValueError(f"--resume: the config differs from the run in {output_dir} in keys that change "
                                 f"what the run is:\n{lines}\nresume with the run's own config "
                                 f"({output_dir / 'config.yaml'}), or start a new run in another output_dir")
            state["config_changes"] = changed
        _remove_stray_temporaries(output_dir)
        return state
    earlier = [name for name in WORK_FILES if (output_dir / name).exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"output_dir {output_dir} holds an earlier run ({', '.join(earlier)}): add --resume to "
                              "continue it, set output_dir=<another folder>, or pass --overwrite to delete it")
    for name in RUN_FILES if overwrite else ():
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    _remove_stray_temporaries(output_dir)
    return None


def config_changes(saved: Mapping, current: Mapping | DictConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for every leaf that differs (or exists on one side only)."""
    if isinstance(current, DictConfig):
        current = OmegaConf.to_container(current, resolve=True)
    old, new = _flatten(saved), _flatten(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _remove_stray_temporaries(output_dir: Path) -> None:
    """A kill during `save_checkpoint` leaves its temporary file: the checkpoint itself is still whole."""
    for stray in output_dir.glob(f".{LAST_CHECKPOINT}.*.tmp"):
        stray.unlink()
