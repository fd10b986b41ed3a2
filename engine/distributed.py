"""Thin torch.distributed helpers that degrade to no-ops in a single process.

Tools launched with ``torchrun`` and with plain ``python`` run the same code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from the torchrun env; joins the process group if world_size > 1.

    ``device="cuda"`` becomes ``cuda:LOCAL_RANK`` so each process owns one GPU.
    """
    rank = launch_rank()
    world_size = launch_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} requested but CUDA is unavailable; use cpu")
        if target.index is None:
            target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if world_size > 1 and not is_distributed():
        if target.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=target)
        else:
            dist.init_process_group(backend="gloo")
    return rank, world_size, target


def launch_rank() -> int:
    """The global rank torchrun gave this process (0 without a launcher), known before the process group exists."""
    return int(os.environ.get("RANK", 0))


def launch_world_size() -> int:
    """The number of processes torchrun started for this run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 is the one that logs, writes files and saves checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (writing a cache or generated data), the other ranks after it (reading)."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (in rank order), None on the others: what only one rank uses
    should not cost every rank the memory of all of it; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks, as a new tensor (the input is left untouched)."""
    total = tensor.clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def reduce_dict_mean(scalars: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of each scalar tensor, as floats for logging (one collective for all)."""
    if not scalars:
        return {}
    keys = sorted(scalars)
    stacked = torch.stack([scalars[k].detach().float().reshape(()) for k in keys])
    mean = all_reduce_sum(stacked) / get_world_size()
    return dict(zip(keys, mean.tolist()))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()

