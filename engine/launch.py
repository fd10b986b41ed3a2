"""How a training tool starts, the same for the three tasks: the command line, the run folder's lock, new run or
resume, the processes, the seed, and whether the run uses the generated demo data. What follows (data, model,
step, evaluation) is the task's.

`data.synthetic.enabled` is `auto` in every tool's default config: the demo set is used when the built-in
default runs (no `--config`, no data path or format on the command line), and never silently in place of a
user's data. `true` / `false` force it on or off."""
from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from .checkpoint import start_run
from .config import parse_args
from .distributed import init_distributed
from .loop import amp_dtype
from .random_state import seed_everything
from .run_lock import lock_output_dir

DATA_KEYS = ("data.root", "data.train.", "data.val.", "data.format")  # overrides that name the user's data


def run_training_tool(doc: str, default_config: str | Path, argv: Sequence[str] | None,
                      train: Callable[[Namespace, DictConfig, float], dict]) -> dict:
    """Parse the tool's command line (`doc` is its --help), settle `data.synthetic.enabled: auto`, and run
    `train(args, cfg, start time)` holding the run folder's lock (one writer per run folder, taken before anything
    is written)."""
    start = time.time()
    args, cfg = parse_args(doc, default_config, argv)
    resolve_demo_data(cfg, args)
    with lock_output_dir(cfg.output_dir):
        return train(args, cfg, start)


def resolve_demo_data(cfg: DictConfig, args: Namespace) -> bool:
    """Turn `data.synthetic.enabled: auto` into true / false (in `cfg`, so the saved config records it)."""
    setting = cfg.data.synthetic.enabled
    if setting == "auto":
        names_data = any(item.split("=", 1)[0].startswith(DATA_KEYS) for item in args.overrides)
        setting = args.config is None and not names_data
    if not isinstance(setting, bool):
        raise ValueError(f"data.synthetic.enabled={setting!r} must be auto, true or false")
    cfg.data.synthetic.enabled = setting
    return setting


def start_training(args: Namespace, cfg: DictConfig) -> tuple[dict[str, Any] | None, torch.device]:
    """(the checkpoint to continue from or None, this process's device): the run folder checked (new run, resume,
    overwrite, eval-only: engine.checkpoint.start_run), the process group joined, an AMP mode this device cannot
    run refused before any data is read, and every random generator seeded for this rank."""
    checkpoint = start_run(cfg.output_dir, cfg, resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only)
    rank, _, device = init_distributed(cfg.device)
    amp_dtype(cfg.train.amp, device)
    seed_everything(cfg.train.seed, rank)
    return checkpoint, device
