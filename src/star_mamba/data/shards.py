"""Pre-resized image shards (``star-mamba prepare-data``, ``data/prepare.py``), read as a stream.

Layout, the WebDataset convention, so that any WebDataset reader (the ``webdataset`` package,
timm's ``wds`` reader) reads the shards too::

    ROOT/<split>/shard-000000.tar     members <key>.jpg (the image) and <key>.cls (class index)
    ROOT/<split>/index.json           samples per shard, class names, source, options

``ROOT`` is a directory or a URL (``http(s)://``, ``gs://``, ``hf://`` ...: anything
``webdataset.gopen`` opens, see the README); shards are read front to back, never seeked.

How an epoch is read (:class:`ShardPlan`). The samples of the split, shard by shard in index
order, are *pieces* ``(shard, first, end)``. Each epoch the pieces are permuted (seeded by
``run.seed`` and the epoch) and concatenated into the epoch's order of N samples. A training
epoch has ``N // (world_size * batch_size)`` batches per rank, whatever the number of
processes; rank r reads the r-th contiguous range of ``batches x batch_size`` samples of that
order (a range may start or end inside a shard: the reader skips to it), so every rank runs
the same number of steps and no rank waits at the end of an epoch; the rest of the epoch is
dropped, as with the map-style sampler. Within a rank, DataLoader worker w (of W) reads the
w-th contiguous part holding ``batches // W`` (+1 for the first ``batches % W``) batches and
yields rank batches w, w + W, w + 2W ... in the DataLoader's round-robin order. Each part
passes a shuffle buffer (``data.shuffle_buffer`` samples, seeded by (seed, epoch, part)), and
each batch is ``batch_size`` consecutive samples of its output; for pretraining, K consecutive
samples of a batch form a sequence, so a sequence never spans two ranks (nor two workers).

Determinism and resume. The buffer's output order is computed from sample positions alone
(:func:`buffer_order`), before any byte is read; each image's augmentation is seeded by
``sample_seed(seed, epoch, id)`` with ``id`` its place in the index (as ``SeededDataset``
does), so an epoch is a function of (seed, epoch, world size, workers). Resuming at rank batch
b, worker w skips its first ``ceil((b - w) / W)`` batches: shards none of whose remaining
samples are needed are not opened, the others are read without decoding what was already
used, and the DataLoader's workers are rotated so that the batches come in the same order
(bit-identical continuation, tested). Resume with the same world size and ``data.num_workers``:
with others the rest of that epoch is another draw.

Bad data. An image that does not decode is replaced by the next readable image of its batch,
augmented with its own seed, and reported like ImageFolder's (``(id, "shard#key", reason)``,
counted over workers and ranks against ``data.max_bad_fraction``). A shard that is not a tar,
is truncated, or holds another number of samples than its index says stops the run with one
line naming it (:class:`ShardError`).
"""
from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import ConfigError, DataError, UserError
from ..seeding import SHARD_STREAM, mix_seed, sample_seed, seed_host
from .folder import decode_rgb

log = logging.getLogger("star_mamba")

INDEX_FILE = "index.json"
INDEX_FORMAT = "star-mamba-shards"
INDEX_VERSION = 1
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the image member of a sample, first found
LABEL_KEY = "cls"

Piece = tuple[int, int, int]  # (shard, first sample, end sample): samples of one shard
Report = tuple[int, str, str]  # (sample id, "shard#key", reason): an unreadable image


class ShardError(UserError):
    """A shard or shard index that cannot be read as one: corrupt, truncated or foreign."""


# ------------------------------------------------------------------------------ locations

def is_url(location: str) -> bool:
    return "://" in str(location)


def join(root: str, *parts: str) -> str:
    """``root/parts...`` for a directory or a URL."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(Path(root, *parts))


def open_stream(location: str):
    """A binary stream of a local file or of a URL (``webdataset.gopen``: http(s) through curl,
    gs through gsutil, hf, pipe:, ...)."""
    if not is_url(location):
        return open(location, "rb")
    from webdataset.gopen import gopen  # imported only for remote data
    return gopen(location, "rb")


# ------------------------------------------------------------------------------ the index

@dataclass(frozen=True)
class ShardIndex:
    """One split's ``index.json``: shard names and sample counts, class names, provenance."""

    location: str  # ROOT/<split>, a directory or a URL
    classes: tuple[str, ...]
    shards: tuple[str, ...]  # file names, in index order
    counts: tuple[int, ...]  # samples per shard
    meta: dict = field(default_factory=dict, compare=False)  # source, options, skipped files

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def url(self, shard: int) -> str:
        return join(self.location, self.shards[shard])

    def offsets(self) -> np.ndarray:
        """(shards,) the index-order id of each shard's first sample."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def read_index(root: str, split: str) -> ShardIndex:
    """``root/split/index.json``; a missing root or index, or a file that is not a shard index,
    raises one line naming it and what to do."""
    root = str(root)
    location, path = join(root, split), join(root, split, INDEX_FILE)
    made_by = "the OUT directory of `star-mamba prepare-data SRC OUT`"
    if not is_url(root):
        if not Path(root).is_dir():
            raise ConfigError(f"data.root={root} does not exist (data.name=shards reads {made_by})")
        if not Path(path).is_file():
            splits = sorted(p.parent.name for p in Path(root).glob(f"*/{INDEX_FILE}"))
            raise ConfigError(f"no shard index {path}: data.root must be {made_by} (splits with an "
                              f"index there: {', '.join(splits) or 'none'})")
    try:
        with open_stream(path) as f:
            values = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not a shard index (not JSON: {e}); re-run "
                         "star-mamba prepare-data") from None
    except Exception as e:  # unreachable URL, permissions, ...
        raise ShardError(f"cannot read shard index {path}: {type(e).__name__}: {e}") from None
    return _parse_index(values, location, path)


def _parse_index(values: Any, location: str, path: str) -> ShardIndex:
    if not isinstance(values, dict) or values.get("format") != INDEX_FORMAT:
        raise ShardError(f"{path} is not a star-mamba shard index (no \"format\": "
                         f"\"{INDEX_FORMAT}\"); make one with star-mamba prepare-data")
    if values.get("version") != INDEX_VERSION:
        raise ShardError(f"{path} is a version {values.get('version')} shard index; this "
                         f"star-mamba reads version {INDEX_VERSION}: re-run prepare-data")
    try:
        shards = values["shards"]
        names = tuple(str(s["name"]) for s in shards)
        counts = tuple(int(s["samples"]) for s in shards)
        classes = tuple(str(c) for c in values["classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path} is a damaged shard index ({type(e).__name__}: {e}); re-run "
                         "star-mamba prepare-data") from None
    if not names or sum(counts) == 0 or min(counts) < 0:
        raise ShardError(f"{path} lists no samples; prepare-data found no readable image for it")
    meta = {k: v for k, v in values.items() if k not in ("shards", "classes")}
    return ShardIndex(location, classes, names, counts, meta)


# ------------------------------------------------------------------------------ the plan

def index_pieces(counts: tuple[int, ...], limit: Optional[int] = None) -> list[Piece]:
    """The samples in use, shard by shard in index order: all, or the first ``limit``."""
    pieces, left = [], sum(counts) if limit is None else limit
    for shard, n in enumerate(counts):
        if left <= 0:
            break
        if n > 0:
            pieces.append((shard, 0, min(n, left)))
            left -= n
    return pieces


def cut(pieces: list[Piece], start: int, stop: int) -> list[Piece]:
    """The pieces holding positions [start, stop) of the concatenation of ``pieces``."""
    out, pos = [], 0
    for shard, a, b in pieces:
        lo, hi = max(start, pos), min(stop, pos + b - a)
        if lo < hi:
            out.append((shard, a + lo - pos, a + hi - pos))
        pos += b - a
        if pos >= stop:
            break
    return out


def buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) the order in which a shuffle buffer of ``buffer_size`` emits positions 0..n-1 that
    arrive in order: filled first, then each arrival replaces a uniformly drawn entry, which
    is emitted; the last ``buffer_size`` leave in random order. A pure function of the
    positions and ``rng``, so it is known before any byte is read."""
    if buffer_size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    picks = rng.integers(0, buffer_size, size=n)
    buf = list(range(min(buffer_size, n)))
    emitted = 0
    for pos in range(len(buf), n):
        i = picks[pos]
        out[emitted] = buf[i]
        emitted += 1
        buf[i] = pos
    out[emitted:] = np.asarray(buf, dtype=np.int64)[rng.permutation(len(buf))]
    return out


def worker_share(batches: int, workers: int, worker: int) -> tuple[int, int]:
    """(first, count): worker ``worker`` of ``workers`` yields rank batches worker,
    worker + workers, ...: ``count`` of them, read from the contiguous part that starts at
    batch-sized slot ``first`` of the rank's range."""
    q, extra = divmod(batches, workers)
    return worker * q + min(worker, extra), q + (worker < extra)


def batches_done(start_batch: int, workers: int, worker: int) -> int:
    """How many of its batches worker ``worker`` yielded before rank batch ``start_batch``."""
    return max(0, -(-(start_batch - worker) // workers))


@dataclass
class WorkerPart:
    """What one (logical) worker reads in one epoch."""

    pieces: list[Piece]  # its samples, in read order
    ids: np.ndarray  # (n,) index-order id of each position of ``pieces``
    order: np.ndarray  # (n,) positions in the order they are used (after the shuffle buffer)


class ShardPlan:
    """Which samples every rank, worker and batch reads in an epoch (see the module docstring).

    For training it stands where :class:`~star_mamba.engine.sampler.BlockShardSampler` stands
    for a map-style dataset (``num_samples``, ``batches_per_epoch``, ``set_epoch(epoch,
    start_batch)``, ``global_block``, ``batch_indices``). ``train=False`` (evaluation): no
    shuffle, every sample once, rank r the r-th contiguous share, each worker a contiguous part
    of it, the last batch of a part possibly short.
    """

    def __init__(self, index: ShardIndex, pieces: list[Piece], batch_size: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 1000, train: bool = True):
        self.index, self.pieces, self.batch_size = index, pieces, batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.workers = workers, max(workers, 1)  # DataLoader workers, parts
        self.seed, self.shuffle_buffer, self.train = seed, shuffle_buffer, train
        self.num_samples = sum(b - a for _, a, b in pieces)
        self.offsets = index.offsets()
        self.epoch, self.start_batch = 0, 0
        self._cache: dict[tuple[int, int], WorkerPart] = {}
        if train and self.batches_per_epoch == 0:
            raise DataError(f"dataset of {self.num_samples} images is smaller than one global "
                             f"batch ({world_size} x optim.batch_size={batch_size})")

    @property
    def batches_per_epoch(self) -> int:
        """Batches per rank and epoch (training): the same on every rank."""
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_block(self, batch: int) -> int:
        return batch * self.world_size + self.rank

    def epoch_pieces(self) -> list[Piece]:
        """The pieces in this epoch's order (training: permuted by (seed, epoch))."""
        if not self.train:
            return list(self.pieces)
        rng = np.random.default_rng(mix_seed(self.seed, self.epoch, SHARD_STREAM))
        return [self.pieces[i] for i in rng.permutation(len(self.pieces))]

    def part_range(self, worker: int) -> tuple[int, int]:
        """[start, stop) of logical worker ``worker``'s part in the epoch's order."""
        if self.train:
            rank_start = self.rank * self.batches_per_epoch * self.batch_size
            first, count = worker_share(self.batches_per_epoch, self.workers, worker)
            start = rank_start + first * self.batch_size
            return start, start + count * self.batch_size
        lo = self.rank * self.num_samples // self.world_size
        n = (self.rank + 1) * self.num_samples // self.world_size - lo
        return lo + worker * n // self.workers, lo + (worker + 1) * n // self.workers

    def part(self, worker: int) -> WorkerPart:
        """Logical worker ``worker``'s part of the current epoch (cached)."""
        key = (self.epoch, worker)
        if key not in self._cache:
            start, stop = self.part_range(worker)
            pieces = cut(self.epoch_pieces(), start, stop)
            ids = np.concatenate([self.offsets[s] + np.arange(a, b) for s, a, b in pieces]
                                 or [np.zeros(0, np.int64)])
            if self.train:
                rng = np.random.default_rng(
                    mix_seed(self.seed, self.epoch, SHARD_STREAM, 1 + start))
                order = buffer_order(len(ids), self.shuffle_buffer, rng)
            else:
                order = np.arange(len(ids), dtype=np.int64)
            self._cache = {key: WorkerPart(pieces, ids, order)}
        return self._cache[key]

    def batch_indices(self, batch: int) -> list[int]:
        """Index-order ids of the samples of this rank's ``batch``-th training batch."""
        part = self.part(batch % self.workers)
        local = batch // self.workers
        return part.ids[part.order[local * self.batch_size:(local + 1) * self.batch_size]].tolist()


# ------------------------------------------------------------------------------ reading

def _corrupt(url: str, error: Exception) -> ShardError:
    return ShardError(f"shard {url} is corrupt or truncated ({type(error).__name__}: "
                      f"{' '.join(str(error).split())}); delete it and re-run `star-mamba "
                      "prepare-data` with the same SRC, OUT and options (it rewrites missing shards)")


def read_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a shard, in order: tar members grouped by
    the name before the first dot of their base name (the WebDataset rule)."""
    try:
        stream = open_stream(url)
    except OSError as e:
        raise ShardError(f"cannot open shard {url} ({type(e).__name__}: {e}); is data.root "
                         "the OUT of `star-mamba prepare-data`?") from None
    key, sample = None, {}
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                name = f"{directory}/{stem}" if directory else stem
                if name != key and key is not None:
                    yield key, sample
                    sample = {}
                key = name
                sample[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise _corrupt(url, e) from None
    if key is not None:
        yield key, sample


def decode_sample(sample: dict[str, bytes], url: str, key: str) -> tuple[Image.Image, int]:
    """(RGB image, label) of one sample; a missing member is a :class:`ShardError`, an image
    that does not decode raises what the decoder raised."""
    try:
        label = int(sample[LABEL_KEY])
        data = next(sample[k] for k in IMAGE_KEYS if k in sample)
    except (KeyError, ValueError, StopIteration):
        raise ShardError(f"shard {url}: sample {key} lacks a .{LABEL_KEY} class index or an "
                         f"image ({', '.join(IMAGE_KEYS)}); members: {', '.join(sample)}") from None
    return decode_rgb(data), label


def read_positions(index: ShardIndex, pieces: list[Piece], needed: set[int]
                   ) -> Iterator[tuple[int, str, str, dict[str, bytes]]]:
    """(position, url, key, sample) for each position in ``needed`` of the concatenation of
    ``pieces``, in read order. A piece none of whose positions is needed is not opened."""
    pos = 0
    for shard, a, b in pieces:
        start = pos
        pos += b - a
        if not any(p in needed for p in range(start, pos)):
            continue
        url, i = index.url(shard), -1
        for i, (key, sample) in enumerate(read_shard(url)):
            if i >= b:
                break
            if i >= a and start + i - a in needed:
                yield start + i - a, url, key, sample
        if i + 1 < b:  # the shard ended early
            raise ShardError(f"shard {url} holds {i + 1} samples but its index says "
                             f"{index.counts[shard]}: it is truncated or was replaced; delete it "
                             "and re-run `star-mamba prepare-data` with the same options")


def in_order(index: ShardIndex, part: WorkerPart, start: int
             ) -> Iterator[tuple[int, str, str, dict[str, bytes]]]:
    """The samples of ``part.order[start:]``, in that order; holds only samples read but not yet
    used (at most about a shuffle buffer's worth)."""
    order = part.order[start:].tolist()
    reader = read_positions(index, part.pieces, set(order))
    store: dict[int, tuple[str, str, dict[str, bytes]]] = {}
    for pos in order:
        while pos not in store:
            got, url, key, sample = next(reader)
            store[got] = (url, key, sample)
        yield (pos, *store.pop(pos))


class _Failure:
    """A :class:`ShardError` met in a DataLoader worker, sent to the main process as an item
    (re-raised there as one line instead of a worker traceback)."""

    def __init__(self, message: str):
        self.message = message


class ShardBatches(IterableDataset):
    """The batches of one rank: in a DataLoader with ``batch_size=None`` and
    ``plan.workers`` workers (or none), each worker yields the batches of its part.

    Training items are ``((images (B, C, H, W), labels (B,)), reports)``, the format the
    training loop reads; evaluation items ``(images, labels)``."""

    def __init__(self, plan: ShardPlan, transform: Callable):
        self.plan, self.transform = plan, transform

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        plan = self.plan
        if workers != plan.workers:
            raise RuntimeError(f"a plan for {plan.workers} workers read by {workers}")
        try:
            if plan.train:  # rotated: the batch after start_batch comes from DataLoader worker 0
                yield from self._train_batches((worker + plan.start_batch) % workers)
            else:
                yield from self._eval_batches(worker)
        except ShardError as e:
            yield _Failure(str(e))

    def _train_batches(self, worker: int):
        plan, b = self.plan, self.plan.batch_size
        part = plan.part(worker)
        done = batches_done(plan.start_batch, plan.workers, worker)
        samples = in_order(plan.index, part, done * b)
        for _ in range(len(part.order) // b - done):
            yield self._batch([next(samples) for _ in range(b)], part)

    def _eval_batches(self, worker: int):
        plan = self.plan
        part = plan.part(worker)
        n, samples = len(part.order), in_order(plan.index, part, 0)
        for start in range(0, n, plan.batch_size):
            chunk = [next(samples) for _ in range(min(plan.batch_size, n - start))]
            (images, labels), reports = self._batch(chunk, part)
            for _, name, reason in reports:
                log.warning(f"unreadable image {name} ({reason}): replaced by the next readable "
                            "image of its batch")
            yield images, labels

    def _batch(self, chunk: list, part: WorkerPart):
        """Decode and transform one batch; unreadable images are replaced by the next readable
        one of the batch, augmented with their own seed, and reported."""
        decoded: list[Optional[tuple[Image.Image, int]]] = []
        reports: list[Report] = []
        for pos, url, key, sample in chunk:
            try:
                decoded.append(decode_sample(sample, url, key))
            except ShardError:
                raise
            except Exception as e:  # a damaged image inside a readable shard
                decoded.append(None)
                reports.append((int(part.ids[pos]), f"{url}#{key}",
                                f"{type(e).__name__}: {e}"))
        if all(d is None for d in decoded):
            raise ShardError(f"no readable image in a batch of {len(chunk)} from "
                             f"{chunk[0][1]}: the shard's images are damaged")
        images, labels = [], []
        for slot, (pos, *_rest) in enumerate(chunk):
            k = slot
            while decoded[k % len(chunk)] is None:
                k += 1
            img, label = decoded[k % len(chunk)]
            seed_host(sample_seed(self.plan.seed, self.plan.epoch, int(part.ids[pos])))
            images.append(self.transform(img))
            labels.append(label)
        return (torch.stack(images), torch.tensor(labels, dtype=torch.int64)), reports


class ShardLoader:
    """A DataLoader over :class:`ShardBatches`, new workers each pass (so they see the plan's
    current epoch and start batch); ``sampler`` is the plan. A :class:`ShardError` met in a
    worker is raised here, as one line."""

    def __init__(self, batches: ShardBatches, pin_memory: bool = False):
        self.batches, self.sampler, self.pin_memory = batches, batches.plan, pin_memory

    def __iter__(self):
        loader = DataLoader(self.batches, batch_size=None, num_workers=self.sampler.num_workers,
                            pin_memory=self.pin_memory)
        for item in loader:
            if isinstance(item, _Failure):
                raise ShardError(item.message)
            yield item


@dataclass
class ShardSet:
    """``data.name=shards``: one split of a prepared shard directory with the transform of its
    task, read as a stream (:meth:`train_loader`, :meth:`eval_loader`); ``len`` is its number
    of samples, ``classes`` the class names of the index."""

    index: ShardIndex
    transform: Callable
    shuffle_buffer: int = 1000
    limit: Optional[int] = None  # use only the first ``limit`` samples in index order

    def __post_init__(self):
        if self.shuffle_buffer < 0:
            raise ConfigError(f"invalid config: data.shuffle_buffer={self.shuffle_buffer}; "
                              "expected >= 0 (0 or 1: no buffer)")
        self.pieces = index_pieces(self.index.counts, self.limit)

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    def __len__(self) -> int:
        return sum(b - a for _, a, b in self.pieces)

    def limited(self, limit: Optional[int]) -> "ShardSet":
        return self if limit is None else replace(self, limit=limit)

    def plan(self, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0,
             seed: int = 0, train: bool = True) -> ShardPlan:
        return ShardPlan(self.index, self.pieces, batch_size, rank, world_size, workers, seed,
                         self.shuffle_buffer, train)

    def train_loader(self, batch_size: int, rank: int = 0, world_size: int = 1,
                     workers: int = 0, seed: int = 0, pin_memory: bool = False) -> ShardLoader:
        """Training batches ``((images, labels), reports)``; ``loader.sampler`` is the plan."""
        plan = self.plan(batch_size, rank, world_size, workers, seed, train=True)
        return ShardLoader(ShardBatches(plan, self.transform), pin_memory)

    def eval_loader(self, batch_size: int, rank: int = 0, world_size: int = 1,
                    workers: int = 0) -> ShardLoader:
        """Evaluation batches ``(images, labels)``: every sample once over the ranks."""
        plan = self.plan(batch_size, rank, world_size, workers, train=False)
        return ShardLoader(ShardBatches(plan, self.transform))


def build_shard_set(root: str, split: str, transform: Callable, shuffle_buffer: int = 1000,
                    limit: Optional[int] = None) -> ShardSet:
    """The split ``split`` of the shard directory (or URL) ``root``."""
    return ShardSet(read_index(root, split), transform, shuffle_buffer, limit)


__all__ = ["INDEX_FILE", "INDEX_FORMAT", "INDEX_VERSION", "ShardBatches", "ShardError",
           "ShardIndex", "ShardLoader", "ShardPlan", "ShardSet", "batches_done", "buffer_order",
           "build_shard_set", "cut", "index_pieces", "read_index", "read_shard", "worker_share"]
