"""The one way to turn a ``data`` config into datasets, for every task and tool.

    build(data, model, split, purpose)  split: "train" (data.split) or "eval" (the eval split)
                                        purpose: "pretrain" (ARM's crops, the built-in data's
                                        light augmentation), "finetune" (timm's RandAugment
                                        pipeline) or "eval" (no augmentation: evaluation, probe
                                        features, diagnostics, figures)
    pretraining_set(data, model, seed)  the training items of a pretraining run: images, or
                                        whole sequences for data.sequence != random
    classification_sets(data, model)    (train, eval, number of classes) of a classifier
    held_out_images(data, model, n)     a fixed batch of eval images (diagnostics, viz)
    segmentation_sets(data, crop_size,  (train, eval, class names) of a segmentation model:
        in_chans, seed)                 data.name scenes, ade20k or seg_folder, which the
                                        functions above refuse

What a dataset is (RGB or not, its statistics, eval split, random access, sequence kinds) comes
from :mod:`.specs`; the limits ``data.max_images`` / ``data.max_eval_images`` apply here.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..config import StarConfig
from ..errors import ConfigError
from .config import DataConfig
from .fashion_mnist import FashionMNIST
from .folder import build_image_folder
from .hf import build_hf_images
from .scenes import SceneDataset
from .detection import DetectionDataOptions, DetectionTransform, SceneDetection, build_coco_detection
from .seg_transforms import SegEvalTransform, SegTrainTransform
from .segmentation import SceneSegmentation, build_ade20k, build_seg_folder
from .sequences import build_sequence_dataset
from .shards import ShardSet, build_shard_set
from .specs import SPECS
from .synthetic import SyntheticImages
from .transforms import (build_eval_transform, build_finetune_transform,
                         build_full_image_transform, build_pretrain_transform)

Split = Literal["train", "eval"]
Purpose = Literal["pretrain", "finetune", "eval"]

HELD_OUT_SEED = 0
"""Seed of the held-out images' draw: fixed, so that runs with different ``run.seed`` are
diagnosed on the same images."""


def check_model(data: DataConfig, model: StarConfig) -> None:
    """The checks every task makes before reading files (one error naming every field at
    fault): ``data.root`` where the dataset needs one, RGB files need ``model.in_chans=3``."""
    problems = []
    if data.spec.root is not None and data.root is None:
        problems.append(f"data.root is required for data.name={data.name!r} ({data.spec.root})")
    if data.spec.rgb and model.in_chans != 3:
        problems.append(f"model.in_chans={model.in_chans} but data.name={data.name} images are "
                        "RGB (3 channels)")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def split_name(data: DataConfig, split: Split) -> str:
    return data.split if split == "train" else data.resolved_eval_split


def rgb_options(data: DataConfig) -> dict:
    """The dataset options of ``data.name`` beyond root, split and transform."""
    if data.name == "shards":  # unreadable images are judged by the training loop
        return {"shuffle_buffer": data.shuffle_buffer}
    options: dict = {"max_bad_fraction": data.max_bad_fraction}
    if data.name == "hf":
        options.update(image_column=data.image_column, label_column=data.label_column)
    return options


def _rgb(data: DataConfig, split: str, transform) -> Dataset:
    readers = {"imagefolder": build_image_folder, "shards": build_shard_set, "hf": build_hf_images}
    return readers[data.name](root=data.root, split=split, transform=transform, **rgb_options(data))


def refuse_segmentation(data: DataConfig, what: str) -> None:
    """A segmentation dataset for a task that reads images with class labels (``what``): one
    :class:`ConfigError` line saying which task reads it."""
    if data.spec.task_kind == "segmentation":
        raise ConfigError(f"invalid config: data.name={data.name} is a segmentation dataset "
                          f"(per-pixel masks), read by `star-mamba segment`, not by {what}")
    if data.spec.task_kind == "detection":
        raise ConfigError(f"invalid config: data.name={data.name} is a detection dataset "
                          f"(boxes and instance masks), read by `star-mamba detect`, not by {what}")


def _dataset(data: DataConfig, model: StarConfig, split: str, purpose: Purpose) -> Dataset:
    """The whole split ``split`` (a name) read for ``purpose``, no limits applied."""
    refuse_segmentation(data, "pretraining" if purpose == "pretrain" else
                        "fine-tuning, linprobe, eval or diagnostics")
    check_model(data, model)
    spec = data.spec
    own_geometry = purpose == "pretrain" and data.sequence in ("views", "clip")
    if data.name == "fashion_mnist":
        if purpose == "finetune":
            tf = build_finetune_transform(data, model.img_size, model.in_chans, spec.mean,
                                          spec.std)
            return FashionMNIST(data.root, split, model.img_size, model.in_chans,
                                download=data.download, pil_transform=tf)
        clip = purpose == "pretrain" and data.sequence == "clip"  # clips read the raw items
        return FashionMNIST(data.root, split, img_size=28 if clip else model.img_size,
                            in_chans=1 if clip else model.in_chans,
                            augment=purpose == "pretrain" and data.augment and not own_geometry,
                            download=data.download)
    if data.name == "synthetic":
        return SyntheticImages(num_images=data.synthetic_images, img_size=model.img_size,
                               in_chans=model.in_chans)
    if purpose == "pretrain":
        tf = build_full_image_transform() if own_geometry else build_pretrain_transform(model.img_size)
    elif purpose == "finetune":
        tf = build_finetune_transform(data, model.img_size, model.in_chans, spec.mean, spec.std)
    else:
        tf = build_eval_transform(model.img_size, data.crop_pct)
    return _rgb(data, split, tf)


def first(dataset: Dataset, n: Optional[int]) -> Dataset:
    """The first ``n`` items of a dataset (all when None; of a shard stream: in index order)."""
    if n is None:
        return dataset
    if isinstance(dataset, ShardSet):
        return dataset.limited(n)
    return Subset(dataset, range(min(n, len(dataset))))


def build(data: DataConfig, model: StarConfig, split: Split = "train",
          purpose: Purpose = "eval") -> Dataset:
    """Split ``split`` of ``data`` read for ``purpose`` (see the module docstring), with
    ``data.max_images`` (train) or ``data.max_eval_images`` (eval) applied."""
    dataset = _dataset(data, model, split_name(data, split), purpose)
    return first(dataset, data.max_images if split == "train" else data.max_eval_images)


def pretraining_set(data: DataConfig, model: StarConfig, seed: int) -> Dataset:
    """The training set of a pretraining run.

    ``data.sequence='random'`` (the paper's setting) gives the images themselves: the trainer
    shuffles images and packs K consecutive ones into a sequence. Any other kind gives a
    :class:`~star_mamba.data.sequences.SequenceDataset` whose items are whole sequences of
    ``model.images_per_sequence`` images drawn from those images, with the options ``data``
    sets and ``seed`` (``run.seed``) for its draws. The kinds that draw their own geometry get
    plain images: ``views`` (K crops of one image) the whole image, without ARM's crop or
    Fashion-MNIST's ``augment``; ``clip`` Fashion-MNIST's raw 28x28 items.
    """
    refuse_segmentation(data, "pretraining")
    images = build(data, model, "train", "pretrain")
    if data.sequence == "random":
        return images
    try:
        return build_sequence_dataset(data.sequence, images, model.images_per_sequence,
                                      model.img_size, model.in_chans, seed,
                                      **data.sequence_options())
    except ValueError as e:  # an option out of range, too few images of a class, ...
        raise ConfigError(f"invalid config: data.sequence={data.sequence!r}: {e}") from None


def num_classes(dataset: Dataset) -> int:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return len(dataset.classes)


def classification_sets(data: DataConfig, model: StarConfig, train: bool = True,
                        augment: bool = True) -> tuple[Optional[Dataset], Dataset, int]:
    """(train set or None, eval set, number of classes) of a classifier. ``augment=False``: the
    training split goes through the evaluation transform (a probe's features)."""
    refuse_segmentation(data, "fine-tuning, linprobe or eval")
    if not data.spec.classes:
        usable = [name for name, s in SPECS.items() if s.classes]
        raise ConfigError(f"invalid config: data.name={data.name!r} for fine-tuning, linprobe "
                          f"and eval; allowed: {', '.join(map(repr, usable))} ({data.name} is "
                          "for pretraining only: its images have no classes to learn)")
    train_set = (build(data, model, "train", "finetune" if augment else "eval")
                 if train else None)
    eval_set = build(data, model, "eval", "eval")
    return train_set, eval_set, num_classes(eval_set)


SEG_CHANNELS = {"scenes": 1, "ade20k": 3, "seg_folder": 3}  # input channels of each dataset


def segmentation_sets(data: DataConfig, crop_size: int, in_chans: int, seed: int,
                      train: bool = True) -> tuple[Optional[Dataset], Dataset, tuple[str, ...]]:
    """(train set or None, eval set, class names) of a segmentation model on ``data``.

    Items are ``(image (in_chans, H, W) float, mask (H, W) int64)`` with ``data.ignore_index``
    on ignored pixels: training ones through :class:`~.seg_transforms.SegTrainTransform`
    (``crop_size`` squares), evaluation ones through :class:`~.seg_transforms.SegEvalTransform`
    (images of any size, masks at their original size). ``data.split`` / the eval split and
    ``data.max_images`` / ``data.max_eval_images`` apply. Scenes: ``data.scene_images`` per
    split, the training ones drawn with ``seed`` (``run.seed``), the evaluation ones always
    with :data:`HELD_OUT_SEED` (runs are compared on the same scenes); ``data.root`` is where
    Fashion-MNIST is looked for."""
    if data.spec.task_kind != "segmentation":
        usable = [n for n, s in SPECS.items() if s.task_kind == "segmentation"]
        raise ConfigError(f"invalid config: data.name={data.name} has no masks to segment; "
                          f"allowed: {', '.join(usable)}")
    problems = []
    if data.spec.root is not None and data.root is None:
        problems.append(f"data.root is required for data.name={data.name!r} ({data.spec.root})")
    if in_chans != SEG_CHANNELS[data.name]:
        problems.append(f"model.in_chans={in_chans} but data.name={data.name} images have "
                        f"{SEG_CHANNELS[data.name]} channel(s)")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    spec = data.spec
    train_tf = SegTrainTransform(crop_size, data.seg_base_scale, tuple(data.seg_ratio),
                                 data.cat_max_ratio, data.hflip, data.photometric, spec.mean,
                                 spec.std, data.ignore_index)
    eval_tf = SegEvalTransform(spec.mean, spec.std, data.seg_base_scale)

    def read(split: str, transform, scene_seed: int) -> Dataset:
        if data.name == "scenes":
            scenes = SceneDataset(data.scene_images, split, scene_seed, data.scene_options(),
                                  data.root)
            return SceneSegmentation(scenes, transform)
        options = dict(ignore_index=data.ignore_index, max_bad_fraction=data.max_bad_fraction)
        if data.reduce_zero_label is not None:
            options["reduce_zero_label"] = data.reduce_zero_label
        builder = build_ade20k if data.name == "ade20k" else build_seg_folder
        return builder(data.root, split, transform, **options)

    train_set = (first(read(data.split, train_tf, seed), data.max_images) if train else None)
    eval_set = first(read(data.resolved_eval_split, eval_tf, HELD_OUT_SEED), data.max_eval_images)
    base = eval_set.dataset if isinstance(eval_set, Subset) else eval_set
    return train_set, eval_set, tuple(base.classes)


def detection_sets(data: DataConfig, opts: DetectionDataOptions, in_chans: int, seed: int,
                   with_masks: bool = True, train: bool = True):
    """(train set or None, eval set, class names with "background" first, label -> dataset
    category id) of a detector on ``data``: ``scenes`` (1 channel; their boxes and visible
    masks) or ``coco`` (3 channels; ``data.root`` the COCO 2017 directory). Items are
    ``(image (C, H, W) float in [0, 1], target dict)`` (torchvision's format; the detector
    normalises); batches need :func:`~.detection.collate_detection`. ``max_images`` /
    ``max_eval_images`` apply; evaluation scenes are drawn with :data:`HELD_OUT_SEED`."""
    if data.name not in ("scenes", "coco"):
        raise ConfigError(f"invalid config: data.name={data.name} has no boxes to detect; "
                          "allowed: scenes, coco")
    channels = 1 if data.name == "scenes" else 3
    if in_chans != channels:
        raise ConfigError(f"invalid config: model.in_chans={in_chans} but data.name={data.name} "
                          f"images have {channels} channel(s)")
    if data.name == "coco" and data.root is None:
        raise ConfigError(f"invalid config: data.root is required for data.name=coco "
                          f"({data.spec.root})")

    def read(split: str, training: bool, count: Optional[int], scene_seed: int):
        if data.name == "scenes":
            n = data.scene_images if count is None else min(count, data.scene_images)
            scenes = SceneDataset(n, split, scene_seed, data.scene_options(), data.root)
            return SceneDetection(scenes, DetectionTransform(opts, training), with_masks)
        return first(build_coco_detection(data.root, split, opts, training, with_masks), count)

    train_set = read(data.split, True, data.max_images, seed) if train else None
    eval_set = read(data.resolved_eval_split, False, data.max_eval_images, HELD_OUT_SEED)
    base = eval_set.dataset if isinstance(eval_set, Subset) else eval_set
    return train_set, eval_set, tuple(base.classes), dict(base.label_to_category)


def describe_eval_data(data: DataConfig) -> str:
    """Which images evaluation reads, for messages."""
    where = f", data.root={data.root}" if data.root is not None else ""
    return f"data.name={data.name}{where}, split {data.resolved_eval_split!r}"


def held_out_source(data: DataConfig) -> str:
    """Where :func:`held_out_images` takes its images from, in words."""
    if data.name == "synthetic":
        return f"synthetic images after the {data.synthetic_images} training ones"
    return f"{data.name} {data.resolved_eval_split!r} split"


def sample_images(dataset: Dataset, n: int, seed: int = HELD_OUT_SEED, start: int = 0) -> Tensor:
    """``n`` images of ``dataset`` (from index ``start`` on) as (n, C, H, W) float32: drawn
    without replacement by a private generator seeded with ``seed`` from a dataset read by
    index, the first ``n`` in index order from a stream (shards). No global generator is
    touched; the same call gives the same images."""
    if isinstance(dataset, ShardSet):
        images, _ = next(iter(dataset.limited(start + n).eval_loader(start + n)))
        return images[start:].float()
    available = len(dataset) - start
    picks = start + torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in picks.tolist()]).float()


def held_out_images(data: DataConfig, model: StarConfig, num_images: int,
                    seed: int = HELD_OUT_SEED, allow_fewer: bool = False) -> Tensor:
    """A fixed batch of ``num_images`` (M) images never trained on, (M, C, H, W) float32, M
    rounded down to a multiple of ``model.images_per_sequence``; with ``allow_fewer``, not above
    what the eval split holds either (else too few raise :class:`ConfigError`).

    The eval split through the evaluation transform (``data.max_eval_images`` not applied);
    synthetic: the images the generator makes after the ``data.synthetic_images`` training
    ones. Drawn by :func:`sample_images` with ``seed``: the same on every call, rank and run.
    """
    k = model.images_per_sequence
    m = num_images - num_images % k
    if m <= 0:
        raise ConfigError(f"invalid config: run.diag_images={num_images} is fewer than "
                          f"model.images_per_sequence={k}; raise it or set run.diag_every=0")
    if data.name == "synthetic":  # no split: the generator's images after the training ones
        start = data.synthetic_images
        dataset: Dataset = SyntheticImages(num_images=start + m, img_size=model.img_size,
                                           in_chans=model.in_chans)
    else:
        start, dataset = 0, _dataset(data, model, data.resolved_eval_split, "eval")
    available = len(dataset) - start
    if available < m and (not allow_fewer or available < k):
        raise ConfigError(f"invalid config: run.diag_images={num_images} but the {data.name} "
                          f"eval split holds {available} images; lower it or set "
                          "run.diag_every=0")
    return sample_images(dataset, min(m, available - available % k), seed, start)


def split_images(data: DataConfig, model: StarConfig, split: str) -> Dataset:
    """The whole split ``split`` (a name) through the evaluation transform (figures)."""
    return _dataset(data, model, split, "eval")


__all__ = ["HELD_OUT_SEED", "build", "check_model", "classification_sets", "describe_eval_data",
           "first", "held_out_images", "held_out_source", "num_classes", "pretraining_set",
           "refuse_segmentation", "rgb_options", "sample_images", "segmentation_sets",
           "split_images", "split_name"]
