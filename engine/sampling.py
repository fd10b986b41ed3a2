"""Which samples a training step sees, and with which randomness: fixed by (seed, epoch), resumable mid-epoch.

`EpochBatches` yields this rank's batches of one epoch as `(index, sample_seed)` pairs, from any batch position;
`SeededDataset` applies each pair's seed around the wrapped dataset's `__getitem__`. Together they make the
data a pure function of (seed, epoch, position): the same for any `num_workers`, and the same after a resume.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

from .random_state import isolated_rng, sample_seed


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of `(index, seed)` for epoch `epoch`, starting at batch `start` (see `set_epoch`).

    The index order is DistributedSampler's (a permutation fixed by seed + epoch, this rank's share; one rank
    is the world_size=1 case). `make_batches` turns that index sampler into a batch sampler, e.g. torch's
    BatchSampler or an aspect-ratio grouped one.
    """

    def __init__(self, dataset: Dataset, *, seed: int, rank: int = 0, world_size: int = 1, batch_size: int,
                 drop_last: bool = False,
                 make_batches: Callable[[Sampler[int], int], Sampler[list[int]]] | None = None) -> None:
        self.seed = seed
        self.indices = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.batches = (make_batches(self.indices, batch_size) if make_batches is not None
                        else BatchSampler(self.indices, batch_size, drop_last=drop_last))
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from its batch `start` (a resumed run skips the batches it already trained on)."""
        self.indices.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in islice(self.batches, self.start, None):
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in batch]

    def __len__(self) -> int:
        return len(self.batches) - self.start

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)


class SeededDataset(Dataset):
    """`dataset[index]` computed under the sample's own seed (python, numpy, torch and albumentations' generator)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.transform = _find_transform(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with isolated_rng(seed):
            if hasattr(self.transform, "set_random_seed"):  # albumentations keeps generators of its own
                self.transform.set_random_seed(seed)
            return self.dataset[index]


def _find_transform(dataset: Any) -> Any:
    """The `transform` of `dataset`, looking through wrappers such as `Subset` (which keep theirs in `.dataset`)."""
    while dataset is not None:
        if getattr(dataset, "transform", None) is not None:
            return dataset.transform
        dataset = getattr(dataset, "dataset", None)
    return None

