"""Datasets: the built-in Fashion-MNIST, ImageFolder trees, pre-resized shards read as a stream
(``shards.py``, written by ``prepare.py``), saved Hugging Face datasets (``hf.py``) and generated
images, and datasets of whole STAR sequences drawn from them (``sequences.py``, ``moving.py``);
for segmentation, the built-in scenes (``scenes.py``), ADE20K and mask folders
(``segmentation.py``) with their joint transforms (``seg_transforms.py``)."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ..errors import ConfigError

from .fashion_mnist import FashionMNIST, find_fashion_mnist
from .folder import build_image_folder
from .hf import build_hf_images
from .scenes import Instance, Scene, SceneDataset, SceneOptions, render_scene
from .seg_transforms import SegEvalTransform, SegTrainTransform
from .segmentation import (ADE20K_CLASSES, SceneSegmentation, SegmentationFolder, build_ade20k,
                           build_seg_folder)
from .shards import ShardSet, build_shard_set
from .sequences import SEQUENCE_KINDS, SequenceDataset, build_sequence_dataset
from .synthetic import SyntheticImages
from .transforms import build_eval_transform, build_pretrain_transform

DATASETS = ("fashion_mnist", "imagefolder", "shards", "hf", "synthetic", "scenes", "ade20k",
            "seg_folder")


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """``fashion_mnist`` (root, split, img_size, in_chans, augment), ``imagefolder`` (root, split,
    transform), ``shards`` (root, split, transform, shuffle_buffer: a :class:`ShardSet`, read
    as a stream), ``hf`` (root, split, transform, image_column, label_column) or ``synthetic``
    (num_images, img_size, in_chans, seed); for segmentation ``scenes`` (num_images, split,
    seed, opts, root: a :class:`SceneDataset` of :class:`Scene` items), ``ade20k`` and
    ``seg_folder`` (root, split, transform, reduce_zero_label, ignore_index,
    max_bad_fraction)."""
    if name == "fashion_mnist":
        return FashionMNIST(**kwargs)
    if name == "imagefolder":
        return build_image_folder(**kwargs)
    if name == "shards":
        return build_shard_set(**kwargs)
    if name == "hf":
        return build_hf_images(**kwargs)
    if name == "synthetic":
        return SyntheticImages(**kwargs)
    if name == "scenes":
        return SceneDataset(**kwargs)
    if name == "ade20k":
        return build_ade20k(**kwargs)
    if name == "seg_folder":
        return build_seg_folder(**kwargs)
    raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")


__all__ = ["ADE20K_CLASSES", "DATASETS", "FashionMNIST", "Instance", "SEQUENCE_KINDS", "Scene",
           "SceneDataset", "SceneOptions", "SceneSegmentation", "SegEvalTransform",
           "SegTrainTransform", "SegmentationFolder", "SequenceDataset", "ShardSet",
           "SyntheticImages", "build_ade20k", "build_dataset", "build_eval_transform",
           "build_hf_images", "build_image_folder", "build_pretrain_transform",
           "build_seg_folder", "build_sequence_dataset", "build_shard_set",
           "find_fashion_mnist", "render_scene"]
