"""The base of the sequence datasets (``sequences.py``, ``moving.py``): items are whole STAR
sequences of K images, asked for by ``(epoch, index)``. See ``sequences.py`` for the kinds, the
item format and where each random draw comes from.

Kept apart from ``sequences.py`` so that the kinds can live in several modules (``moving.py``
holds ``clip``) and ``sequences.py`` can build any of them without an import cycle.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..seeding import SEQUENCE_STREAM, mix_seed, seed_host


def split_key(key: Any) -> tuple[int, int]:
    """``(epoch, index)`` from an ``(epoch, index)`` pair or a plain index (epoch 0)."""
    if isinstance(key, (tuple, list)):
        epoch, index = key
        return int(epoch), int(index)
    return 0, int(key)


class SequenceDataset(Dataset):
    """Base class: ``len`` sequences of K images, items keyed by ``(epoch, index)``.

    ``shuffled_per_epoch``: the items of an epoch already come in a seeded random order of
    their own (``random``), so a training sampler takes them in index order; otherwise it
    shuffles the sequence indices per epoch."""

    kind = ""
    shuffled_per_epoch = False

    def __init__(self, images_per_sequence: int, num_sequences: int, seed: int,
                 img_size: Optional[int] = None, in_chans: Optional[int] = None):
        if images_per_sequence <= 0:
            raise ValueError(f"invalid images_per_sequence={images_per_sequence}; expected >= 1")
        if num_sequences <= 0:
            raise ValueError(f"{self.kind} sequences: num_sequences={num_sequences}; expected >= 1 "
                             "(is the base dataset smaller than images_per_sequence?)")
        if seed < 0:
            raise ValueError(f"invalid seed={seed}; expected >= 0")
        self.images_per_sequence, self.num_sequences, self.seed = images_per_sequence, num_sequences, seed
        self.img_size, self.in_chans = img_size, in_chans
        self._order_cache: tuple[int, Tensor] | None = None  # (epoch, permutation), per process

    def __len__(self) -> int:
        return self.num_sequences

    def key(self, key: Any) -> tuple[int, int]:
        epoch, index = split_key(key)
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence index {index} out of range for {self.num_sequences} sequences")
        return epoch, index

    def generator(self, epoch: int, index: int) -> torch.Generator:
        """The private generator of sequence ``index`` in ``epoch``."""
        return torch.Generator().manual_seed(mix_seed(self.seed, epoch, SEQUENCE_STREAM, index))

    def epoch_order(self, epoch: int, n: int, seed: int) -> Tensor:
        """``randperm(n)`` from ``manual_seed(seed)``, cached for the last epoch asked."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            g = torch.Generator().manual_seed(seed)
            self._order_cache = (epoch, torch.randperm(n, generator=g))
        return self._order_cache[1]

    def load(self, base: Dataset, image: int, aug_seed: int, check_size: bool = True) -> tuple[Tensor, int]:
        """``base[image]`` with the global RNGs reseeded first (the base's augmentation)."""
        seed_host(aug_seed)  # the CPU draws of the base's transform
        x, y = base[image]
        if not isinstance(x, Tensor) or x.ndim != 3:
            raise ValueError(f"{self.kind} sequences: base item {image} is {type(x).__name__} "
                             f"{tuple(getattr(x, 'shape', ()))}; expected a (C, H, W) tensor")
        expected_c = self.in_chans if self.in_chans is not None else x.shape[0]
        expected = (expected_c,) + ((self.img_size,) * 2 if check_size and self.img_size else tuple(x.shape[1:]))
        if tuple(x.shape) != expected:
            raise ValueError(f"{self.kind} sequences: base image {image} has shape {tuple(x.shape)}; "
                             f"expected {expected} (in_chans={self.in_chans}, img_size={self.img_size})")
        return x.float(), int(y)

    def __getitem__(self, key: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def resize(x: Tensor, size: int) -> Tensor:
    """(C, H, W) -> (C, size, size), bilinear, antialiased when shrinking."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


__all__ = ["SequenceDataset", "resize", "split_key"]
