"""Every random generator a run uses, seeded once, saved in checkpoints and restored on resume.

Two rules make runs exact: the training process's generators (python, numpy, torch CPU and CUDA) are part of
the checkpoint, and each sample's augmentation randomness is derived from (seed, epoch, sample index) alone, in
an isolated scope, so neither the DataLoader worker count nor a resume changes what a sample looks like.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices) with ``seed + rank``.

    Offsetting by rank keeps runs reproducible while ranks draw different model-side randomness.
    """
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample of one epoch (numpy's SeedSequence mixes the three well)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (CPU) with `seed` inside the block, and put the caller's states back after.

    Data loading in the main process (num_workers=0) thus leaves the training generators untouched, exactly as
    loading in worker processes does.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed would reseed CUDA too
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def get_rng_state() -> dict[str, Any]:
    """The process's generator states as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    return {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `get_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
