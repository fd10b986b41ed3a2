"""Training checkpoints that are safe to write (atomic) and safe to read (``weights_only``), and the rules for
starting a run in a folder that may hold one (new run, ``--resume [auto]``, ``--overwrite``, ``--eval-only``).

Only tensors and plain Python containers are stored, so loading never unpickles arbitrary
objects and a crash mid-save never leaves a truncated ``last.pth`` behind. A file that cannot be read, or that
does not fit the model, is an error naming the file and what is wrong; so is a save that fails (disk full).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .distributed import launch_rank, launch_world_size

logger = logging.getLogger(__name__)
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise CheckpointSaveError(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        os.unlink(tmp)
        cause = _os_error(err)
        if cause is not None:  # torch.save may wrap the write's OSError into a RuntimeError of its zip writer
            raise CheckpointSaveError(path, cause) from err
        raise


class CheckpointSaveError(OSError):
    """A checkpoint that could not be written (disk full, permission...): names the file and the cause. The
    previous file at that path, if any, is untouched (the write goes to a temporary file first)."""

    def __init__(self, path: Path, cause: OSError) -> None:
        code = errno.errorcode.get(cause.errno, "") if cause.errno else ""
        reason = f"{cause.strerror or cause} ({code})" if code else str(cause)
        kept = "the previous one is unchanged" if path.is_file() else "no earlier checkpoint exists"
        super().__init__(cause.errno, f"cannot write checkpoint {path}: {reason}; {kept}")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError (with an errno) that `err` is or was raised from, if any."""
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return err
        err = err.__cause__ or err.__context__
    return None


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
    state = read_checkpoint(path, map_location=map_location)
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"checkpoint {path}: not a ResDet training checkpoint (no 'model' state dict in it)")
    if model is not None:
        load_model_weights(model, state["model"], path)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is not None and state.get(name) is not None:
            target.load_state_dict(state[name])
    return state


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the model; the message names the file."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with an error that names the file and says what is wrong with it
    (empty, not a checkpoint, truncated or damaged, holding pickled objects) instead of torch's own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler fails on arbitrary bytes with any of a dozen types
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        with open(path, "rb") as f:
            head = f.read(8)
        if isinstance(err, pickle.UnpicklingError) and pickled:
            what = (f"holds pickled Python objects ({pickled.group(1)}), not only tensors: checkpoints are read "
                    "with torch.load(weights_only=True), which runs no code from the file; save the model's "
                    "state_dict() instead")
        elif head.startswith(b"PK\x03\x04"):  # a zip archive, as torch.save writes, that torch cannot read
            reason = str(err).split(". ")[0].strip()[:160] or type(err).__name__
            what = f"the file is damaged or truncated ({size} bytes; {reason})"
        else:
            what = f"not a PyTorch checkpoint (torch.save writes a zip archive; this file starts with {head!r})"
        raise CheckpointError(f"checkpoint {path}: {what}") from None


def load_model_weights(model: nn.Module, state_dict: Mapping[str, Any], source: str | Path) -> None:
    """`model.load_state_dict(state_dict)` (strict), refusing a state dict of another model with counts and a
    few examples of what does not fit instead of every key."""
    own = unwrap_model(model).state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    reshaped = [key for key in own if key in state_dict and getattr(state_dict[key], "shape", None) != own[key].shape]
    if missing or unexpected or reshaped:
        problems = [f"{len(missing)} of the model's {len(own)} tensors are missing (e.g. {_examples(missing)})"
                    if missing else "",
                    f"{len(unexpected)} tensors the model has no place for (e.g. {_examples(unexpected)})"
                    if unexpected else "",
                    f"{len(reshaped)} have another shape (e.g. {reshaped[0]}: "
                    f"{tuple(getattr(state_dict[reshaped[0]], 'shape', ()))} in the file, "
                    f"{tuple(own[reshaped[0]].shape)} in the model)" if reshaped else ""]
        raise CheckpointError(f"checkpoint {source} does not fit this model: {'; '.join(p for p in problems if p)}. "
                              "Is it another model's checkpoint, or does the config's model section differ from "
                              "the run that wrote it?")
    unwrap_model(model).load_state_dict(state_dict)


def _examples(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


# Keys a resumed run may change: they lengthen the run or touch evaluation, logging and loading speed only.
SAFE_RESUME_CHANGES = ("train.epochs", "train.iters", "train.log_every", "train.checkpoint_every", "eval.",
                       "data.num_workers", "data.val_limit", "output_dir")
WORK_FILES = (LAST_CHECKPOINT, "history.jsonl", "metrics.json")  # a folder holding one of these holds a run
RESUME_AUTO = "auto"  # --resume auto: continue the run if output_dir holds a checkpoint, else start one
RUN_FILES = (*WORK_FILES, "config.yaml", "resumes.jsonl", "eval_metrics.json", "invalid_train.txt",
             "invalid_val.txt", "tb", "report", "eval_metrics_report")  # what --overwrite deletes


def start_run(output_dir: str | Path, config: Mapping | DictConfig, *, resume: bool | str = False,
              overwrite: bool = False, eval_only: bool = False) -> dict[str, Any] | None:
    """Check `output_dir` before anything is written, and return the checkpoint to continue from (or None).

    A new run never lands on an earlier one: a folder holding a run is an error unless `resume` (the saved
    config must agree on everything but SAFE_RESUME_CHANGES, and the number of processes must be the same) or
    `overwrite` (the earlier run's files are deleted). `resume="auto"` continues the run when the folder holds a
    checkpoint and starts a new one otherwise: one command line for the first start and every restart. A folder
    whose run never wrote a checkpoint (nor finished) holds nothing to resume: a new run replaces its files and
    says so. `eval_only` needs a checkpoint. Stray temporaries of a save that was killed are removed. Only rank 0
    changes files (holding the folder's lock, engine.run_lock); every rank reads the checkpoint.
    """
    output_dir = Path(output_dir)
    path = output_dir / LAST_CHECKPOINT
    writer = launch_rank() == 0
    if resume and overwrite:
        raise ValueError("--resume continues the run in output_dir, --overwrite deletes it: choose one")
    if resume == RESUME_AUTO:
        resume = path.is_file()
    if eval_only or resume:
        if not path.is_file():
            flag = "--eval-only" if eval_only else "--resume"
            raise FileNotFoundError(f"{flag}: no {LAST_CHECKPOINT} in {output_dir}; train first, or point "
                                    "output_dir at a finished run")
        state = read_checkpoint(path)
        if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
            raise CheckpointError(f"checkpoint {path}: not a checkpoint of a ResDet training tool (no model state "
                                  "dict in it)")
        if resume:
            state["config_changes"] = _resumable_changes(state, config, path)
        if writer:
            _remove_stray_temporaries(output_dir)
        return state
    earlier = [name for name in WORK_FILES if (output_dir / name).exists()]
    unfinished = bool(earlier) and LAST_CHECKPOINT not in earlier and "metrics.json" not in earlier
    if earlier and not overwrite and not unfinished:
        raise FileExistsError(f"output_dir {output_dir} holds an earlier run ({', '.join(earlier)}): add --resume "
                              "(or --resume auto) to continue it, set output_dir=<another folder>, or pass "
                              "--overwrite to delete it")
    if writer and unfinished and not overwrite:
        logger.warning("output_dir %s holds a run that never wrote a checkpoint (%s): nothing to resume; starting a "
                       "new run there, replacing its files", output_dir, ", ".join(earlier))
    for name in RUN_FILES if writer and (overwrite or unfinished) else ():
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    if writer:
        _remove_stray_temporaries(output_dir)
    return None


def _resumable_changes(state: dict, config: Mapping | DictConfig, path: Path) -> dict[str, tuple[Any, Any]]:
    """The config changes a resume makes (all in SAFE_RESUME_CHANGES, or an error), by as many processes as the
    run had."""
    output_dir = path.parent
    changed = config_changes(state.get("config") or {}, config)
    refused = {key: change for key, change in changed.items() if not key.startswith(SAFE_RESUME_CHANGES)}
    if refused:
        lines = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in sorted(refused.items()))
        raise ValueError(f"--resume: the config differs from the run in {output_dir} in keys that change "
                         f"what the run is:\n{lines}\nresume with the run's own config "
                         f"({output_dir / 'config.yaml'}), or start a new run in another output_dir")
    saved_world = state.get("loop", {}).get("world_size", launch_world_size())
    if saved_world != launch_world_size():
        raise ValueError(f"--resume: the run in {output_dir} was trained by {saved_world} process(es), this launch "
                         f"has {launch_world_size()}: resume with the same number (the data order and the random "
                         "states are per rank, so elastic torchrun --nnodes MIN:MAX is not supported)")
    return changed


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
