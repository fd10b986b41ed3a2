"""Aspect-ratio grouped batching: batch landscape images with landscape ones and portrait with portrait, so
padding a batch to its largest image wastes little memory and compute.

Hand-written port of torchvision's `references/detection/group_by_aspect_ratio.py`, which ships with the
torchvision repository but not with the installed package.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from itertools import cycle, islice

from torch.utils.data import Sampler


def aspect_ratio_groups(aspect_ratios: Sequence[float]) -> list[int]:
    """Group id per image from its width / height: 1 = landscape or square (w >= h), 0 = portrait (w < h)."""
    return [int(ratio >= 1.0) for ratio in aspect_ratios]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` indices from `sampler`, every batch from a single group.

    Works over any index sampler (RandomSampler, DistributedSampler, ...). There are always
    `len(sampler) // batch_size` batches, as with drop_last: when the sampler runs out, the fullest leftover
    buffers are topped up by repeating indices of the same group seen this epoch.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        remaining = len(self)
        for index in self.sampler:
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                remaining -= 1
        for group, buffer in sorted(buffers.items(), key=lambda item: len(item[1]), reverse=True):
            if remaining <= 0:
                break
            yield buffer + list(islice(cycle(seen[group]), self.batch_size - len(buffer)))
            remaining -= 1

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the inner sampler (DistributedSampler reshuffles per epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
