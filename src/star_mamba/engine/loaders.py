"""The data loaders of training and evaluation: how a dataset is read by one rank of a run."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.sequences import ReportedSequences, SequenceDataset, collate_sequences_reported
from ..data.shards import ShardSet
from ..errors import ConfigError, DataError
from .config import RunConfig
from .dist import DistInfo
from .sampler import EpochIndexSampler, SeededDataset, collate_reported


class TrainingItems(NamedTuple):
    """What the training loader reads (:func:`training_items`)."""

    dataset: Dataset  # items ((images, labels), unreadable-image reports) keyed (epoch, index)
    batch_size: int  # items per process and micro-batch
    collate: Callable  # items -> ((images (B, C, H, W), labels (B,)), reports)
    shuffle: bool  # whether the sampler shuffles the items per epoch
    num_images: int  # images per epoch, for the unreadable-image limit
    what: str  # for the log


def training_items(dataset: Dataset, batch_size: int, seed: int, world_size: int,
                   collate: Optional[Callable[[list], Any]] = None) -> TrainingItems:
    """How ``dataset`` is read in training; ``optim.batch_size`` (``batch_size``) counts images
    per process and micro-batch either way.

    A dataset of images is read image by image (:class:`SeededDataset`; pretraining packs K
    consecutive images of the shuffled data into a sequence). A :class:`SequenceDataset` is read
    sequence by sequence, ``batch_size // K`` per micro-batch (:class:`ReportedSequences`): the
    sampler shards whole sequences, so a sequence is never split across ranks."""
    if not isinstance(dataset, SequenceDataset):
        batches = collate_reported if collate is None else with_reports(collate)
        return TrainingItems(SeededDataset(dataset, seed), batch_size, batches, True,
                             len(dataset), f"{len(dataset)} images")
    k = dataset.images_per_sequence
    if batch_size % k:
        raise ConfigError(f"invalid config: optim.batch_size={batch_size} must be a multiple of "
                          f"the {k} images of a sequence")
    if len(dataset) < world_size * (batch_size // k):
        raise DataError(f"{len(dataset)} {dataset.kind} sequences are fewer than one global batch "
                        f"({world_size} process(es) x optim.batch_size={batch_size} images = "
                        f"{world_size * (batch_size // k)} sequences of {k})")
    return TrainingItems(ReportedSequences(dataset), batch_size // k, collate_sequences_reported,
                         not dataset.shuffled_per_epoch, len(dataset) * k,
                         f"{len(dataset) * k} images ({len(dataset)} {dataset.kind} sequences of {k})")


class with_reports:  # noqa: N801 - used as a function; a class so that workers can pickle it
    """A task's collate of samples, batched with their unreadable-image reports as
    :func:`collate_reported` does."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, items: list[tuple[Any, list]]) -> tuple[Any, list]:
        return self.collate([sample for sample, _ in items]), [r for _, rs in items for r in rs]


def training_loader(dataset: Any, cfg: RunConfig, info: DistInfo, device: torch.device,
                    collate: Optional[Callable[[list], Any]] = None) -> tuple[Any, int, str]:
    """(loader, images per epoch, what for the log). The loader yields ``((images, targets),
    reports)`` (``collate``: how samples become ``(images, targets)``, default_collate's
    stacking by default) and its ``sampler`` is the epoch's :class:`~.sampler.BatchPlan`: a
    :class:`EpochIndexSampler` over a map-style dataset, or, for shards
    (:class:`~star_mamba.data.shards.ShardSet`), the stream's own plan, which gives every rank
    the same number of batches."""
    o, r, workers = cfg.optim, cfg.run, cfg.data.num_workers
    if isinstance(dataset, ShardSet):
        loader = dataset.train_loader(o.batch_size, info.rank, info.world_size, workers, r.seed,
                                      pin_memory=device.type == "cuda")
        return loader, len(dataset), (f"{len(dataset)} images in {len(dataset.index.shards)} "
                                      f"shards (streamed, buffer {dataset.shuffle_buffer})")
    items = training_items(dataset, o.batch_size, r.seed, info.world_size, collate)
    sampler = EpochIndexSampler(len(items.dataset), items.batch_size, info.rank, info.world_size,
                                r.seed, shuffle=items.shuffle)
    loader = DataLoader(items.dataset, batch_size=items.batch_size,
                        sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        collate_fn=items.collate,  # (images, targets), unreadable-image reports
                        drop_last=True, persistent_workers=workers > 0,
                        # the workers' base seed comes from here, not from the global RNG
                        generator=torch.Generator().manual_seed(r.seed))
    return loader, items.num_images, items.what


def eval_loader(dataset: Dataset, batch_size: int, info: DistInfo, num_workers: int) -> Any:
    """Each rank takes every world_size-th image (a shard stream: a contiguous share), so the
    summed counts are exact."""
    if isinstance(dataset, ShardSet):
        return dataset.eval_loader(batch_size, info.rank, info.world_size, num_workers)
    indices = list(range(info.rank, len(dataset), info.world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers)
