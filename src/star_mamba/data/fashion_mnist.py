"""Fashion-MNIST, the built-in dataset: read from the four IDX files, no network needed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .idx import read_idx
from ..errors import ConfigError, DataError, MissingFileError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
# Mean and std of the 60k training images' pixels in [0, 1] (computed once from the train split).
MEAN, STD = 0.2860, 0.3530
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def candidate_dirs(root: Optional[str | Path] = None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    dirs = []
    if root is not None:
        root = Path(root)
        dirs += [root, root / "FashionMNIST" / "raw"]  # plain directory, torchvision's layout
    if os.environ.get("STAR_MAMBA_DATA"):
        env = Path(os.environ["STAR_MAMBA_DATA"])
        dirs += [env, env / "fashion-mnist", env / "FashionMNIST" / "raw"]
    if root is None:
        dirs += [DEBIAN_DIR, Path("data") / "FashionMNIST" / "raw"]
    return dirs


def find_fashion_mnist(root: Optional[str | Path] = None) -> Path:
    """The first directory holding all four IDX files; a clear error with the fix if none does."""
    searched = candidate_dirs(root)
    for d in searched:
        if all(_find_file(d, stem) for pair in FILES.values() for stem in pair):
            return d
    raise MissingFileError(
        "Fashion-MNIST not found (searched: " + ", ".join(str(d) for d in searched) + "). "
        f"Install it with `{INSTALL_HINT}`, or pass a directory holding the four IDX files "
        "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz]) as data.root.")


class FashionMNIST(Dataset):
    """Fashion-MNIST as (image (in_chans, img_size, img_size) float, label) pairs.

    28x28 images are scaled to [0, 1], zero-padded symmetrically to ``img_size`` and normalised
    with the training set's mean and std; grey is repeated to 3 channels when ``in_chans=3``.
    ``augment`` adds random horizontal flips and random translations of up to 2 pixels.
    ``pil_transform`` replaces all of this: it receives the padded image as a greyscale PIL
    image (for timm's augmentation pipelines) and returns the tensor.
    ``download`` fetches the files with torchvision into ``root`` (default ``data/``) when they
    are nowhere to be found and a network is available.
    """

    classes = CLASSES

    def __init__(self, root: Optional[str | Path] = None, split: str = "train", img_size: int = 32,
                 in_chans: int = 1, augment: bool = False, download: bool = False,
                 transform: Optional[Callable] = None, pil_transform: Optional[Callable] = None):
        if split not in FILES:
            raise ConfigError(f"invalid split {split!r} for Fashion-MNIST; allowed: 'train', 'test'")
        if img_size < 28 or (img_size - 28) % 2:
            raise ConfigError(f"invalid img_size={img_size} for Fashion-MNIST: 28x28 images are "
                             "zero-padded, so it must be 28 + an even number (e.g. 32)")
        if in_chans not in (1, 3):
            raise ConfigError(f"invalid in_chans={in_chans} for Fashion-MNIST; allowed: 1, 3")
        try:
            directory = find_fashion_mnist(root)
        except FileNotFoundError:
            if not download:
                raise
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST
            root = Path(root) if root is not None else Path("data")
            TorchvisionFashionMNIST(str(root), train=split == "train", download=True)
            directory = find_fashion_mnist(root)
        images_stem, labels_stem = FILES[split]
        images = read_idx(_find_file(directory, images_stem))
        labels = read_idx(_find_file(directory, labels_stem))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DataError(f"{directory}: Fashion-MNIST {split} files have shapes "
                             f"{images.shape} and {labels.shape}; expected (N, 28, 28) and (N,)")
        self.root = directory
        self.images = torch.from_numpy(np.array(images))  # (N, 28, 28) uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))  # (N,)
        self.img_size, self.in_chans, self.augment, self.transform = img_size, in_chans, augment, transform
        self.pil_transform = pil_transform
        self.pad = (img_size - 28) // 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.pil_transform is not None:
            padded = F.pad(self.images[index], (self.pad,) * 4).numpy()  # (S, S) uint8
            return self.pil_transform(Image.fromarray(padded, mode="L")), int(self.labels[index])
        x = self.images[index].float().div_(255).unsqueeze(0)  # (1, 28, 28) in [0, 1]
        x = F.pad(x, (self.pad,) * 4)  # (1, S, S), zeros around
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            dy, dx = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        x = (x - MEAN) / STD
        if self.in_chans == 3:
            x = x.expand(3, -1, -1).clone()
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])
