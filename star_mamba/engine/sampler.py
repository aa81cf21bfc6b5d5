"""A deterministic, resumable sampler that shards each global batch across ranks in blocks."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


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
            raise ValueError(f"dataset of {num_samples} images is smaller than one global batch "
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

    def batch_indices(self, batch: int) -> list[int]:
        """Dataset indices of this rank's ``batch``-th batch of the current epoch."""
        start = batch * self.batch_size * self.world_size + self.rank * self.batch_size
        return self._order()[start:start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        b, G = self.batch_size, self.batch_size * self.world_size
        for i in range(self.start_batch, self.batches_per_epoch):
            start = i * G + self.rank * b
            yield from order[start:start + b].tolist()
