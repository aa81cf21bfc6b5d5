"""Moving Fashion-MNIST clips, in the manner of Moving MNIST (Srivastava et al. 2015).

A clip is K frames of a ``canvas_size`` x ``canvas_size`` canvas (64 by default, as Moving MNIST)
in which one or two 28x28 Fashion-MNIST items move with a constant velocity and bounce off the
borders. Geometry, per item (all drawn from the clip's private generator, see below):

* top-left corner p = (y, x) uniform in [0, L]^2, L = canvas_size - 28 (36 for 64);
* velocity: a speed uniform in ``speed`` (default 2 to 5 canvas pixels per frame; Moving MNIST
  moves about 3.6) in a uniformly drawn direction;
* frame t+1: p + v, reflected at the borders (q < 0 -> -q, q > L -> 2L - q, flipping that
  component of v), so the item always stays whole inside the canvas;
* positions are real numbers: an item is drawn at a sub-pixel position by splatting it
  bilinearly onto the 4 neighbouring pixel offsets, so each item's mass and centre of mass move
  exactly with p (no rounding jitter); two items are composited with a pixelwise max.

The canvas (pixels in [0, 1], 0 background) is then resized to ``img_size`` (bilinear,
antialiased; none when they are equal: pass ``canvas_size=img_size`` to render directly at the
model's size), normalised with Fashion-MNIST's MEAN/STD exactly like ``FashionMNIST`` (so the
background is the same value as its zero padding) and repeated to ``in_chans`` channels. At the
default img_size 32 an item is 14 pixels wide in a 32-pixel frame.

A clip is a function of (seed, index) only (``per_epoch=True``: of (seed, epoch, index), new
clips every epoch); its labels are the label of its first item, repeated K times.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..errors import DataError

from .fashion_mnist import MEAN, STD
from .sequence_base import SequenceDataset, resize


def _raw_fashion(dataset: Dataset) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """(images (M, h, w) uint8, labels (M,), index map (len(dataset),)) of a Fashion-MNIST-like
    dataset (``images`` uint8 and ``labels`` tensors), followed through ``Subset``; else None."""
    if isinstance(dataset, Subset):
        inner = _raw_fashion(dataset.dataset)
        if inner is None:
            return None
        images, labels, index = inner
        return images, labels, index[torch.as_tensor(list(dataset.indices), dtype=torch.int64)]
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.ndim == 3
            and isinstance(labels, Tensor) and labels.shape == images.shape[:1]
            and len(dataset) == len(images)):
        return images, labels.long(), torch.arange(len(images))
    return None


def _bounce(q: float, v: float, limit: float) -> tuple[float, float]:
    """Reflect position ``q`` (moving with ``v``) into [0, limit]."""
    while q < 0 or q > limit:
        if q < 0:
            q, v = -q, -v
        else:
            q, v = 2 * limit - q, -v
    return q, v


def splat(canvas: Tensor, sprite: Tensor, y: float, x: float) -> None:
    """Add ``sprite`` (h, w) to ``canvas`` (S+1, S+1) at the real top-left corner (y, x),
    0 <= y, x <= S - h, w, spread bilinearly over the 4 neighbouring integer offsets."""
    h, w = sprite.shape
    iy, ix = int(math.floor(y)), int(math.floor(x))
    fy, fx = y - iy, x - ix
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            if wy * wx > 0:
                canvas[iy + dy:iy + dy + h, ix + dx:ix + dx + w] += (wy * wx) * sprite


class MovingFashionClips(SequenceDataset):
    """``num_sequences`` clips of K frames; item ``(frames (K, C, img, img), labels (K,))``.

    ``sprite(i)`` gives base item i as an (h, w) image in [0, 1] and its label; build it with
    :meth:`from_dataset`. See the module docstring for the geometry.
    """

    kind = "clip"

    def __init__(self, sprite: Callable[[int], tuple[Tensor, int]], num_base: int,
                 images_per_sequence: int, img_size: int, in_chans: int = 1, seed: int = 0,
                 num_sequences: Optional[int] = None, canvas_size: int = 64,
                 num_items: tuple[int, int] | int = (1, 2), speed: tuple[float, float] = (2.0, 5.0),
                 per_epoch: bool = False, mean: float = MEAN, std: float = STD):
        super().__init__(images_per_sequence,
                         num_sequences if num_sequences is not None else num_base // images_per_sequence,
                         seed, img_size, in_chans)
        num_items = (num_items, num_items) if isinstance(num_items, int) else tuple(num_items)
        if num_base <= 0:
            raise ValueError("clip sequences: the base dataset is empty")
        if not 1 <= num_items[0] <= num_items[1]:
            raise ValueError(f"clip sequences: num_items={num_items}; expected 1 <= min <= max")
        if not 0 <= speed[0] <= speed[1]:
            raise ValueError(f"clip sequences: speed={tuple(speed)}; expected 0 <= min <= max")
        if img_size <= 0 or in_chans <= 0 or canvas_size <= 0 or std <= 0:
            raise ValueError("clip sequences need positive img_size, in_chans, canvas_size and std")
        self.sprite, self.num_base = sprite, num_base
        self.canvas_size, self.num_items, self.speed = canvas_size, num_items, tuple(speed)
        self.per_epoch, self.mean, self.std = per_epoch, mean, std
        first = sprite(0)[0]  # fail at build time, not in a worker, when items do not fit
        if first.ndim != 2 or first.shape[0] >= canvas_size or first.shape[1] >= canvas_size:
            raise ValueError(f"clip sequences: base items are {tuple(first.shape)}, which do not "
                             f"fit (and move) in a canvas_size={canvas_size} canvas")

    @classmethod
    def from_dataset(cls, base: Dataset, images_per_sequence: int, img_size: int,
                     in_chans: int = 1, seed: int = 0, **options: Any) -> "MovingFashionClips":
        """Clips of the items of ``base``: a Fashion-MNIST dataset (or a ``Subset`` of one) is
        read from its raw 28x28 uint8 images, whatever its own img_size, padding and
        augmentation; any other dataset of (C, h, w) tensors gives sprites as the channel mean,
        min-max scaled to [0, 1] when it leaves that range."""
        raw = _raw_fashion(base)
        if raw is not None:
            images, labels, index = raw

            def sprite(i: int) -> tuple[Tensor, int]:
                j = int(index[i])
                return images[j].float() / 255, int(labels[j])
        else:
            def sprite(i: int) -> tuple[Tensor, int]:
                x, y = base[i]
                x = torch.as_tensor(x, dtype=torch.float32)
                x = x.mean(0) if x.ndim == 3 else x
                lo, hi = float(x.min()), float(x.max())
                if lo < 0 or hi > 1:
                    x = (x - lo) / max(hi - lo, 1e-12)
                return x, int(y)
        return cls(sprite, len(base), images_per_sequence, img_size, in_chans, seed, **options)

    def clip(self, key: Any) -> dict[str, Any]:
        """The clip's parameters: ``items`` (base indices), ``sprites`` [(h, w)], ``labels``,
        ``positions`` (K, n, 2) and ``velocities`` (K, n, 2) float64, (y, x) top-left corners on
        the canvas; ``velocities[t]`` carries frame t to t+1 (before reflection)."""
        epoch, index = self.key(key)
        g = self.generator(epoch if self.per_epoch else 0, index)
        n = int(torch.randint(self.num_items[0], self.num_items[1] + 1, (1,), generator=g))
        items = torch.randint(self.num_base, (n,), generator=g).tolist()
        k, s = self.images_per_sequence, self.canvas_size
        positions = torch.zeros(k, n, 2, dtype=torch.float64)
        velocities = torch.zeros(k, n, 2, dtype=torch.float64)
        sprites, labels = [], []
        for j, item in enumerate(items):
            sprite, label = self.sprite(item)
            if sprite.ndim != 2 or sprite.shape[0] >= s or sprite.shape[1] >= s:
                raise DataError(f"clip sequences: item {item} is {tuple(sprite.shape)}, which does "
                                 f"not fit (and move) in a canvas_size={s} canvas")
            sprites.append(sprite)
            labels.append(label)
            limits = (s - sprite.shape[0], s - sprite.shape[1])
            u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
            p = [u[0] * limits[0], u[1] * limits[1]]
            angle = 2 * math.pi * u[2]
            speed = self.speed[0] + (self.speed[1] - self.speed[0]) * u[3]
            v = [speed * math.sin(angle), speed * math.cos(angle)]
            for t in range(k):
                positions[t, j] = torch.tensor(p, dtype=torch.float64)
                velocities[t, j] = torch.tensor(v, dtype=torch.float64)
                for a in (0, 1):
                    p[a], v[a] = _bounce(p[a] + v[a], v[a], limits[a])
        return dict(items=items, sprites=sprites, labels=labels, positions=positions,
                    velocities=velocities)

    def render(self, key: Any) -> tuple[Tensor, list[int]]:
        """(K, canvas, canvas) frames in [0, 1] and the items' labels."""
        c = self.clip(key)
        k, s = self.images_per_sequence, self.canvas_size
        frames = torch.zeros(k, s, s)
        for t in range(k):
            for j, sprite in enumerate(c["sprites"]):
                layer = torch.zeros(s + 1, s + 1)
                y, x = c["positions"][t, j].tolist()
                splat(layer, sprite, y, x)
                torch.maximum(frames[t], layer[:s, :s], out=frames[t])
        return frames, c["labels"]

    def __getitem__(self, key: Any) -> tuple[Tensor, Tensor]:
        frames, labels = self.render(key)
        frames = resize(frames, self.img_size)  # (K, img, img): the K frames as channels
        frames = ((frames - self.mean) / self.std).unsqueeze(1)  # (K, 1, img, img)
        frames = frames.expand(-1, self.in_chans, -1, -1).contiguous()
        return frames, torch.full((self.images_per_sequence,), labels[0], dtype=torch.int64)


__all__ = ["MovingFashionClips", "splat"]
