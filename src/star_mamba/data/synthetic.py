"""Deterministic generated images for quick demos and tests (no files needed)."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """Smooth structured images: an oriented gradient plus a shape whose kind is the label.

    Labels: 0-4 a disc / square / horizontal bar / vertical bar / ring, in one of two
    brightness polarities (labels 5-9), so a classifier can learn them. Image ``i`` is the
    same for the same ``seed`` whatever order it is drawn in.
    """

    num_classes = 10

    def __init__(self, num_images: int = 2048, img_size: int = 32, in_chans: int = 3, seed: int = 0):
        if num_images <= 0 or img_size <= 0 or in_chans <= 0:
            raise ValueError("SyntheticImages needs positive num_images, img_size and in_chans")
        self.num_images, self.img_size, self.in_chans, self.seed = num_images, img_size, in_chans, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.img_size
        label = int(torch.randint(10, (1,), generator=g))
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
        angle = float(torch.rand((), generator=g)) * 2 * math.pi
        gradient = 0.5 * (math.cos(angle) * xx + math.sin(angle) * yy)  # (s, s)
        cy, cx = (torch.rand(2, generator=g) * 0.8 - 0.4).tolist()
        r = 0.25 + 0.2 * float(torch.rand((), generator=g))
        dy, dx = yy - cy, xx - cx
        kind = label % 5
        if kind == 0:
            shape = (dy ** 2 + dx ** 2 < r ** 2)
        elif kind == 1:
            shape = (dy.abs() < r) & (dx.abs() < r)
        elif kind == 2:
            shape = (dy.abs() < r / 3) & (dx.abs() < 2 * r)
        elif kind == 3:
            shape = (dx.abs() < r / 3) & (dy.abs() < 2 * r)
        else:
            d = (dy ** 2 + dx ** 2).sqrt()
            shape = (d < r) & (d > r / 2)
        sign = 1.0 if label < 5 else -1.0
        image = gradient + sign * 1.5 * shape.float()  # (s, s)
        tint = 0.7 + 0.6 * torch.rand(self.in_chans, 1, 1, generator=g)
        noise = 0.01 * torch.randn(self.in_chans, s, s, generator=g)
        return image.unsqueeze(0) * tint + noise, label
