"""Datasets: the built-in Fashion-MNIST, ImageFolder trees and generated images, and datasets of
whole STAR sequences drawn from them (``sequences.py``, ``moving.py``)."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from .fashion_mnist import FashionMNIST, find_fashion_mnist
from .folder import build_image_folder
from .sequences import SEQUENCE_KINDS, SequenceDataset, build_sequence_dataset
from .synthetic import SyntheticImages
from .transforms import build_eval_transform, build_pretrain_transform

DATASETS = ("fashion_mnist", "imagefolder", "synthetic")


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """``fashion_mnist`` (root, split, img_size, in_chans, augment), ``imagefolder`` (root, split,
    transform) or ``synthetic`` (num_images, img_size, in_chans, seed)."""
    if name == "fashion_mnist":
        return FashionMNIST(**kwargs)
    if name == "imagefolder":
        return build_image_folder(**kwargs)
    if name == "synthetic":
        return SyntheticImages(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")


__all__ = ["DATASETS", "FashionMNIST", "SEQUENCE_KINDS", "SequenceDataset", "SyntheticImages",
           "build_dataset", "build_eval_transform", "build_image_folder", "build_pretrain_transform",
           "build_sequence_dataset", "find_fashion_mnist"]
