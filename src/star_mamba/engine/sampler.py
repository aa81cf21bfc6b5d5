"""Data order and randomness: a deterministic, resumable sampler that shards each global batch
across ranks in blocks, and the seeds of every random draw, derived from (run seed, epoch,
position in the global data order) so that they do not depend on the number of processes.

A *block* is one rank's micro-batch: global batch i (``world_size * batch_size`` images) is cut
into ``world_size`` contiguous blocks, block ``i * world_size + r`` going to rank r. One process
with batch b and ``accum_iter = 2A`` and two processes with batch b and ``accum_iter = A`` see the
same blocks, in the same optimizer steps, with the same seeds.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch
from torch.utils.data import Dataset, Sampler, default_collate

from ..data.folder import collect_unreadable
from ..errors import DataError
from ..seeding import sample_seed, seed_host  # every seed stream: star_mamba/seeding.py


class BatchPlan(Protocol):
    """What the trainer asks of the sampler of its training loader, whichever data it reads:
    :class:`BlockShardSampler` (and :class:`EpochIndexSampler`) over a map-style dataset, or
    ``data.shards.ShardPlan`` over a shard stream."""

    @property
    def batches_per_epoch(self) -> int:
        """This rank's batches in one epoch (the same on every rank)."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` at batch ``start_batch`` (a resumed epoch)."""

    def global_block(self, batch: int) -> int:
        """The place of this rank's ``batch``-th block in the global data order (its seeds)."""

    def batch_indices(self, batch: int) -> list[int]:
        """Dataset indices of this rank's ``batch``-th batch (for messages)."""


class BlockShardSampler(Sampler[int]):
    """Shuffled per epoch from ``seed + epoch``; global batch i is indices [i*G, (i+1)*G) with
    G = world_size * batch_size, and rank r takes the r-th contiguous block of it.

    Contiguous blocks keep the images packed into one sequence identical whatever the number
    of processes, so a 2-process run sees the same sequences as a 1-process run with the same
    global batch. ``set_epoch(epoch, start_batch)`` resumes in the middle of an epoch. Only
    full global batches are drawn (the remainder of an epoch is dropped).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise DataError(f"dataset of {num_samples} images is smaller than one global batch "
                             f"({world_size} x optim.batch_size={batch_size})")

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_samples, generator=g)
        return torch.arange(self.num_samples)

    def global_block(self, batch: int) -> int:
        """The index in the global data order of this rank's block of global batch ``batch``."""
        return batch * self.world_size + self.rank

    def batch_indices(self, batch: int) -> list[int]:
        """Dataset indices of this rank's ``batch``-th batch of the current epoch."""
        start = self.global_block(batch) * self.batch_size
        return self._order()[start:start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        for i in range(self.start_batch, self.batches_per_epoch):
            start = self.global_block(i) * self.batch_size
            yield from order[start:start + self.batch_size].tolist()


class EpochIndexSampler(BlockShardSampler):
    """:class:`BlockShardSampler` yielding ``(epoch, index)`` pairs, the keys of
    :class:`SeededDataset` (DataLoader workers cannot see the sampler's epoch otherwise)."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class SeededDataset(Dataset):
    """``dataset[index]`` with its augmentation drawn from ``sample_seed(seed, epoch, index)``:
    the same image gets the same augmentation in ``epoch`` whichever worker, rank or world
    size loads it, and resuming mid-epoch replays it exactly.

    Keys are ``(epoch, index)`` pairs (:class:`EpochIndexSampler`). The global generators are
    reseeded and not restored: in DataLoader workers they belong to nobody else, and in the
    main process (``num_workers=0``) training reseeds them per micro-batch anyway.

    An item is ``(sample, reports)``: ``reports`` lists the unreadable image that ``index``
    names, if it is one, as ``(index, path, reason)`` (``folder.collect_unreadable``), so that
    the training loop can count them over workers and ranks; :func:`collate_reported` batches
    them.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, list[tuple[int, str, str]]]:
        epoch, index = key
        seed_host(sample_seed(self.seed, epoch, index))  # the CPU draws of its transform
        with collect_unreadable() as reports:
            sample = self.dataset[index]
        return sample, reports


def collate_reported(items: list[tuple[Any, list]]) -> tuple[Any, list[tuple[int, str, str]]]:
    """:class:`SeededDataset` items -> (the batch as ``default_collate`` makes it, all reports)."""
    return default_collate([sample for sample, _ in items]), [r for _, rs in items for r in rs]


__all__ = ["BatchPlan", "BlockShardSampler", "EpochIndexSampler", "SeededDataset", "collate_reported"]
