"""Seeds of every random draw in training, hashed from (run seed, epoch, stream, position).

A low-level module (numpy, torch, python's ``random``; nothing of the package) shared by the
engine (``engine/sampler.py``: block and sample seeds) and the datasets (``data/sequences.py``:
sequence seeds), so that ``data`` does not import ``engine``.

Domain tags keep the families of seeds apart, so that e.g. block k and sample k get unrelated
seeds; every stream of the package is listed here:

=====  =====================  =================================================================
tag    name                   seeds
=====  =====================  =================================================================
0      ``BLOCK_STREAM``       model-side draws (drop path, mixup) of one micro-batch (block)
1      ``SAMPLE_STREAM``      the augmentation of one image (``SeededDataset``, ``random``)
2      ``SEQUENCE_STREAM``    a sequence's own draws (class, members, crops, clip parameters)
3      ``SLOT_STREAM``        the base augmentation of one image slot of a sequence
4      ``ORDER_STREAM``       a sequence dataset's per-epoch permutation (``views``' sources)
5      ``SHARD_STREAM``       a shard stream's per-epoch shard order and shuffle buffers
=====  =====================  =================================================================
"""
from __future__ import annotations

import random

import numpy as np
import torch

BLOCK_STREAM, SAMPLE_STREAM, SEQUENCE_STREAM, SLOT_STREAM, ORDER_STREAM, SHARD_STREAM = range(6)
SEED_BITS = 63  # torch, python and numpy (as two 32-bit words) all take a 63-bit seed


def mix_seed(*key: int) -> int:
    """A 63-bit seed hashed from non-negative integers with numpy's SeedSequence (so (1, 2) and
    (2, 1), or seed + index collisions, give unrelated seeds)."""
    state = np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0]
    return int(state) >> (64 - SEED_BITS)


def block_seed(seed: int, epoch: int, block: int) -> int:
    """The seed of the model-side draws (drop path, mixup/cutmix) of one block (micro-batch)."""
    return mix_seed(seed, epoch, BLOCK_STREAM, block)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the augmentation of dataset image ``index`` in ``epoch``."""
    return mix_seed(seed, epoch, SAMPLE_STREAM, index)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every GPU) global generators."""
    seed_host(seed)
    torch.manual_seed(seed)


def seed_host(seed: int) -> None:
    """Seed python's, numpy's and torch's CPU generators only: what an image transform draws
    from, per image in DataLoader workers. The same CPU streams as :func:`seed_everything`, but
    about 1 us instead of 120 us (torch.manual_seed also queues a seed for every lazily
    initialised accelerator, recording a stack trace each time)."""
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # numpy's legacy seed: 32-bit words
    torch.default_generator.manual_seed(seed)


__all__ = ["BLOCK_STREAM", "ORDER_STREAM", "SAMPLE_STREAM", "SEED_BITS", "SEQUENCE_STREAM",
           "SHARD_STREAM", "SLOT_STREAM", "block_seed", "mix_seed", "sample_seed", "seed_everything",
           "seed_host"]
