"""Datasets whose items are whole STAR sequences: K images that belong together (or not).

STAR packs K images into one sequence. Today's pipeline does it implicitly: the sampler shuffles
*images*, and K consecutive images of a micro-batch form a sequence. The datasets here make the
sequence the item instead, so that what is packed together can be chosen:

=============  ==========================================================================
kind           one item (sequence ``index`` of ``epoch``)
=============  ==========================================================================
``random``     images ``order[index*K:(index+1)*K]`` of the epoch's image permutation: exactly
               the images today's pipeline packs (the paper's setting, see below)
``same_class`` K distinct images of one class, the class drawn per sequence
``views``      K RandomResizedCrop + flip views of ONE image, each resized to ``img_size``
``clip``       K consecutive frames of a moving-Fashion-MNIST clip (``moving.py``)
=============  ==========================================================================

An item is ``(frames (K, C, H, W) float32, labels (K,) int64)``; :func:`collate_sequences`
stacks B items into ``(images (B*K, C, H, W), labels (B*K,))`` with image k of sequence b at
``b*K + k``, the order :class:`~star_mamba.models.pretrain.StarPretrain` expects. A sampler over
these datasets shards *sequences*, so a sequence is never split across ranks.

Keys and randomness. Like :class:`~star_mamba.engine.sampler.SeededDataset`, an item is asked
for by ``(epoch, index)`` (the keys :class:`~star_mamba.engine.sampler.EpochIndexSampler`
yields; a plain ``int`` means epoch 0), and nothing depends on worker state:

* the sequence's own draws (class, members, source image, crop boxes, clip parameters) come
  from a private ``torch.Generator`` seeded with ``mix_seed(seed, epoch, 2, index)`` (domain
  tag 2, apart from the sampler's block (0) and sample (1) streams; every stream is listed in
  ``star_mamba/seeding.py``); the global RNGs are not used for them;
* the base dataset's own augmentation (Fashion-MNIST ``augment``, an ImageFolder transform)
  draws from the global RNGs, which are reseeded before each base image is loaded: for
  ``random`` with ``sample_seed(seed, epoch, image_index)``, exactly as ``SeededDataset`` does
  (so ``random`` reproduces today's images *and* augmentations bit for bit); for the other
  kinds with ``mix_seed(seed, epoch, 3, index, k)``, one seed per (sequence, slot), so an image
  drawn twice in an epoch is augmented independently.

``random`` and today's path. Today ``BlockShardSampler`` draws ``order =
randperm(N, manual_seed(seed + epoch))`` and rank r's b-image block of global batch i is
``order[(i*world + r)*b : ...]``, cut into b/K sequences. :class:`RandomSequences` item s is
``order[s*K:(s+1)*K]`` with the same ``order``, so an ``EpochIndexSampler`` over the N // K
sequences with ``batch_size = b // K`` and ``shuffle=False`` (the shuffle lives in ``order``)
gives every rank, step and epoch the same images in the same places as today (tested). The
dataset length is N // K sequences, and the sampler's full-global-batch rule drops the same
remainder.

Unreadable images (ImageFolder): wrap the dataset in :class:`ReportedSequences` and batch with
:func:`collate_sequences_reported` to get ``((images, labels), reports)``, the item format the
training loop reads. For ``random`` each bad file is reported once per epoch as today; the
other kinds draw images with replacement, so a bad file is reported each time it is drawn.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..seeding import ORDER_STREAM, SLOT_STREAM, mix_seed, sample_seed
from .folder import collect_unreadable
from .moving import MovingFashionClips
from .sequence_base import SequenceDataset, resize, split_key

SEQUENCE_KINDS = ("random", "same_class", "views", "clip")


def dataset_labels(dataset: Dataset) -> Tensor:
    """(N,) int64 labels of ``dataset`` without loading its images where possible: ``Subset``
    is followed to its parent, ``targets`` (ImageFolder) and ``labels`` (Fashion-MNIST) are
    read; anything else is iterated once (``dataset[i][1]``)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices))]
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and not callable(values) and len(values) == len(dataset):
            return torch.as_tensor(values, dtype=torch.int64)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


class RandomSequences(SequenceDataset):
    """The paper's setting: K images of a seeded per-epoch permutation of the base dataset, the
    very images (and augmentations) today's image-level pipeline packs; N // K sequences."""

    kind = "random"
    shuffled_per_epoch = True  # the permutation is in the items: sample them in index order

    def __init__(self, base: Dataset, images_per_sequence: int, seed: int = 0,
                 img_size: Optional[int] = None, in_chans: Optional[int] = None):
        super().__init__(images_per_sequence, len(base) // images_per_sequence, seed, img_size, in_chans)
        self.base = base

    def images_of(self, key: Any) -> list[int]:
        """Base indices of sequence ``key``: ``order[index*K:(index+1)*K]``."""
        epoch, index = self.key(key)
        k = self.images_per_sequence
        # BlockShardSampler._order: randperm(N) seeded with seed + epoch
        order = self.epoch_order(epoch, len(self.base), self.seed + epoch)
        return order[index * k:(index + 1) * k].tolist()

    def __getitem__(self, key: Any) -> tuple[Tensor, Tensor]:
        epoch, _ = self.key(key)
        items = [self.load(self.base, i, sample_seed(self.seed, epoch, i)) for i in self.images_of(key)]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


class SameClassSequences(SequenceDataset):
    """K distinct images of one class. Per sequence the class is that of a uniformly drawn
    image among the classes holding at least K images (so classes come as often as in the
    data), then K distinct members are drawn without replacement. Sequences are independent
    draws: an image may appear in several sequences of an epoch, or in none."""

    kind = "same_class"

    def __init__(self, base: Dataset, images_per_sequence: int, seed: int = 0,
                 num_sequences: Optional[int] = None, img_size: Optional[int] = None,
                 in_chans: Optional[int] = None, labels: Optional[Sequence[int] | Tensor] = None):
        super().__init__(images_per_sequence,
                         num_sequences if num_sequences is not None else len(base) // images_per_sequence,
                         seed, img_size, in_chans)
        self.base = base
        labels = dataset_labels(base) if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (len(base),):
            raise ValueError(f"same_class sequences: {labels.shape[0]} labels for {len(base)} images")
        classes, counts = labels.unique(return_counts=True)
        kept = classes[counts >= images_per_sequence]
        if len(kept) == 0:
            raise ValueError(f"same_class sequences: no class holds images_per_sequence="
                             f"{images_per_sequence} images (largest: {int(counts.max())})")
        self.members = {int(c): (labels == c).nonzero().flatten() for c in kept}
        self.eligible = torch.cat(list(self.members.values()))  # images of the kept classes
        self.labels = labels

    def images_of(self, key: Any) -> list[int]:
        epoch, index = self.key(key)
        g = self.generator(epoch, index)
        anchor = int(self.eligible[torch.randint(len(self.eligible), (1,), generator=g)])
        members = self.members[int(self.labels[anchor])]
        pick = torch.randperm(len(members), generator=g)[:self.images_per_sequence]
        return members[pick].tolist()

    def __getitem__(self, key: Any) -> tuple[Tensor, Tensor]:
        epoch, index = self.key(key)
        items = [self.load(self.base, i, mix_seed(self.seed, epoch, SLOT_STREAM, index, k))
                 for k, i in enumerate(self.images_of(key))]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float], g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` drawing from ``g``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=g).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the clamped ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ViewSequences(SequenceDataset):
    """K augmented views of ONE image: per view a RandomResizedCrop box (``scale`` of the
    area, aspect ``ratio``; ARM's pretraining range by default) cut from the base image at its
    full resolution, resized to ``img_size`` (bilinear, antialiased) and flipped horizontally
    with probability ``flip_prob``. The source of sequence s in an epoch is image ``order[s % N]``
    of a seeded per-epoch permutation, so the N // K sequences of an epoch use N // K distinct
    images and successive epochs cycle through the others. All K labels are the source's."""

    kind = "views"

    def __init__(self, base: Dataset, images_per_sequence: int, img_size: int, seed: int = 0,
                 num_sequences: Optional[int] = None, in_chans: Optional[int] = None,
                 scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5):
        super().__init__(images_per_sequence,
                         num_sequences if num_sequences is not None else len(base) // images_per_sequence,
                         seed, img_size, in_chans)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"views sequences: scale={tuple(scale)}; expected 0 < min <= max <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"views sequences: ratio={tuple(ratio)}; expected 0 < min <= max")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"views sequences: flip_prob={flip_prob}; expected within [0, 1]")
        self.base, self.scale, self.ratio, self.flip_prob = base, tuple(scale), tuple(ratio), flip_prob

    def source_of(self, key: Any) -> int:
        epoch, index = self.key(key)
        order = self.epoch_order(epoch, len(self.base), mix_seed(self.seed, epoch, ORDER_STREAM))
        return int(order[index % len(self.base)])

    def __getitem__(self, key: Any) -> tuple[Tensor, Tensor]:
        epoch, index = self.key(key)
        source = self.source_of(key)
        x, y = self.load(self.base, source, mix_seed(self.seed, epoch, SLOT_STREAM, index, 0),
                         check_size=False)
        g = self.generator(epoch, index)
        views = []
        for _ in range(self.images_per_sequence):
            top, left, h, w = random_resized_crop_box(x.shape[1], x.shape[2], self.scale, self.ratio, g)
            view = resize(x[:, top:top + h, left:left + w], self.img_size)
            if float(torch.rand((), generator=g)) < self.flip_prob:
                view = view.flip(-1)
            views.append(view)
        return torch.stack(views), torch.full((self.images_per_sequence,), y, dtype=torch.int64)


def collate_sequences(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """B items ``(frames (K, C, H, W), labels (K,))`` -> ``(images (B*K, C, H, W), labels
    (B*K,))``: image k of sequence b at ``b*K + k``."""
    frames = torch.stack([f for f, _ in batch])  # (B, K, C, H, W)
    labels = torch.stack([torch.as_tensor(y, dtype=torch.int64) for _, y in batch])  # (B, K)
    return frames.flatten(0, 1), labels.flatten()


class ReportedSequences(Dataset):
    """``dataset[key]`` -> ``(item, reports)``, the unreadable base images met while loading
    the item as ``(index, path, reason)`` (``folder.collect_unreadable``), for the training
    loop's count (``engine.trainer.BadImages``)."""

    def __init__(self, dataset: SequenceDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> tuple[tuple[Tensor, Tensor], list[tuple[int, str, str]]]:
        with collect_unreadable() as reports:
            item = self.dataset[key]
        return item, reports


def collate_sequences_reported(items: Sequence[tuple[tuple[Tensor, Tensor], list]]
                               ) -> tuple[tuple[Tensor, Tensor], list[tuple[int, str, str]]]:
    """:class:`ReportedSequences` items -> ``((images, labels), reports)``, as
    ``engine.sampler.collate_reported`` batches image items."""
    return collate_sequences([item for item, _ in items]), [r for _, rs in items for r in rs]


# The options each kind takes (build_sequence_dataset); None values are ignored.
SEQUENCE_OPTIONS: dict[str, tuple[str, ...]] = {
    "random": (),
    "same_class": ("num_sequences", "labels"),
    "views": ("num_sequences", "scale", "ratio", "flip_prob"),
    "clip": ("num_sequences", "canvas_size", "num_items", "speed", "per_epoch", "mean", "std"),
}


def build_sequence_dataset(kind: str, base_dataset: Dataset, images_per_sequence: int,
                           img_size: int, in_chans: int, seed: int = 0,
                           **options: Any) -> SequenceDataset:
    """A dataset of sequences of ``images_per_sequence`` images of ``kind`` (``SEQUENCE_KINDS``)
    drawn from ``base_dataset``. Options per kind (``SEQUENCE_OPTIONS``); an option given as
    None is ignored (the kind's default), one of another kind raises ValueError:

    * ``random``: none (always ``len(base) // K`` sequences);
    * ``same_class``: ``num_sequences`` (default ``len(base) // K``), ``labels``;
    * ``views``: ``num_sequences``, ``scale`` (0.2, 1.0), ``ratio`` (3/4, 4/3), ``flip_prob`` 0.5;
    * ``clip``: ``num_sequences``, ``canvas_size`` 64, ``num_items`` (1, 2), ``speed``
      (2.0, 5.0), ``per_epoch`` False, ``mean``/``std`` (Fashion-MNIST's); see ``moving.py``.
    """
    if kind not in SEQUENCE_KINDS:
        raise ValueError(f"unknown sequence kind {kind!r}; allowed: {', '.join(SEQUENCE_KINDS)}")
    options = {name: value for name, value in options.items() if value is not None}
    unknown = sorted(set(options) - set(SEQUENCE_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"sequence kind {kind!r} takes no option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(SEQUENCE_OPTIONS[kind]) or 'none'}")
    common = dict(images_per_sequence=images_per_sequence, seed=seed, img_size=img_size,
                  in_chans=in_chans)
    if kind == "random":
        return RandomSequences(base_dataset, **common)
    if kind == "same_class":
        return SameClassSequences(base_dataset, **common, **options)
    if kind == "views":
        return ViewSequences(base_dataset, **common, **options)
    return MovingFashionClips.from_dataset(base_dataset, **common, **options)


__all__ = ["SEQUENCE_KINDS", "SEQUENCE_OPTIONS", "SequenceDataset", "RandomSequences", "SameClassSequences",
           "ViewSequences", "MovingFashionClips", "ReportedSequences", "build_sequence_dataset",
           "collate_sequences", "collate_sequences_reported", "dataset_labels",
           "random_resized_crop_box", "resize", "split_key"]
