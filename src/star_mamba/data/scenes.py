"""The built-in scene dataset: a few 28 px items placed on a textured canvas, with their
semantic map and per-instance visible masks and boxes (segmentation now, detection later).

A scene is drawn from ``(seed, split, index)`` alone, by its own ``numpy`` generator (never the
global one), so item ``i`` is the same whatever order, worker or process reads it. Items come
from an :class:`ItemPool`: Fashion-MNIST's images (the train images for split ``train``, the
test images for ``test``) or generated shapes (10 classes, a different pool per split). Each
item is resized to a random scale, flipped at random, given a random brightness gain and
placed at a random position with at least ``min_inside`` of its side on the canvas along each
axis; later items occlude earlier ones. An item's mask is where its resized intensity exceeds
``threshold``. The background is smooth low-frequency noise plus oriented stripes whose
intensities overlap the items', so that a threshold alone does not segment a scene.

Rendering one 64 px scene takes a fraction of a millisecond; the pools are built once per
process (``functools.lru_cache``).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, MissingFileError
from . import fashion_mnist as fm

log = logging.getLogger("star_mamba")

ITEM_SIDE = 28  # side of a source item (Fashion-MNIST's and the shapes')
SOURCES = ("auto", "fashion_mnist", "shapes")
SPLIT_STREAMS = {"train": 0, "test": 1}  # seed stream of each split: disjoint scenes
SHAPES = ("disc", "square", "triangle", "ring", "cross", "bars", "diamond", "frame", "crescent",
          "half-disc")
SHAPE_POOL_SEED = 20240917  # the shape pools' generator (with the split's stream)
SHAPE_INTENSITY = (110.0, 250.0)  # range of a shape's base intensity, above any usual threshold
SHAPE_TEXTURE = (45.0, 12.0)  # a shape's gradient amplitude and pixel noise (intensity units)
SHAPE_RADIUS = (0.55, 0.9)  # a shape's size, in half-sides of its 28 px square
SHAPE_TILT = 0.35  # a shape's rotation range (radians, either way)
MAX_INTENSITY = 255.0


@dataclass(frozen=True)
class SceneOptions:
    """How scenes are drawn. The first four are ``data.scene_*``; the rest are fixed defaults."""

    canvas: int = 64  # square canvas side (pixels)
    items: tuple[int, int] = (2, 4)  # min, max items per scene
    scale: tuple[float, float] = (0.7, 1.6)  # item side relative to the 28 px source item
    source: str = "auto"  # fashion_mnist | shapes | auto (Fashion-MNIST if found, else shapes)
    threshold: int = 40  # item mask: resized item intensity above this (0..254)
    min_visible: int = 16  # an instance with fewer visible pixels is dropped (and not drawn)
    min_inside: float = 0.5  # share of an item's side kept on the canvas along each axis
    gain: tuple[float, float] = (0.75, 1.25)  # random brightness gain of an item's pixels
    background: tuple[float, float] = (30.0, 170.0)  # background intensity range
    noise_cells: int = 4  # low-frequency noise: a (cells + 1)^2 random grid, interpolated
    stripe_period: tuple[float, float] = (4.0, 12.0)  # stripe period range (pixels)
    stripe_share: float = 0.35  # share of the background range taken by the stripes
    pixel_noise: float = 4.0  # std of the per-pixel noise over the whole image
    shapes_per_class: int = 256  # shapes source: pool variants per class and split

    def __post_init__(self) -> None:
        def pair(name, low_ok):
            lo, hi = getattr(self, name)
            if not (low_ok(lo) and lo <= hi):
                raise ValueError(f"{name}={tuple(getattr(self, name))}: expected (min, max) "
                                 f"with min <= max and min {'>= 0' if name == 'items' else '> 0'}")
        if self.canvas < 1:
            raise ValueError(f"canvas={self.canvas}: expected a positive side in pixels")
        pair("items", lambda lo: lo >= 0)
        if self.items[1] < 1:
            raise ValueError(f"items={tuple(self.items)}: expected at least one item at most")
        pair("scale", lambda lo: lo > 0)
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}: allowed: {', '.join(SOURCES)}")
        if not 0 <= self.threshold < MAX_INTENSITY:
            raise ValueError(f"threshold={self.threshold}: expected 0..254")
        if self.min_visible < 1 or not 0 < self.min_inside <= 1:
            raise ValueError(f"min_visible={self.min_visible}, min_inside={self.min_inside}: "
                             "expected min_visible >= 1 and min_inside in (0, 1]")
        pair("gain", lambda lo: lo > 0)
        pair("background", lambda lo: lo >= 0)
        pair("stripe_period", lambda lo: lo > 0)
        if self.noise_cells < 1 or not 0 <= self.stripe_share <= 1 or self.pixel_noise < 0:
            raise ValueError("noise_cells >= 1, stripe_share in [0, 1] and pixel_noise >= 0 "
                             "expected")
        if self.shapes_per_class < 1:
            raise ValueError(f"shapes_per_class={self.shapes_per_class}: expected >= 1")


@dataclass(frozen=True)
class ItemPool:
    """The source items: ``images`` (N, 28, 28) uint8, ``labels`` (N,) int64 in 0..9."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]  # the 10 item class names
    source: str  # fashion_mnist | shapes


@dataclass
class Instance:
    """One visible item: ``label`` 0..9, ``box`` (x0, y0, x1, y1) the tight box of the visible
    pixels in pixel-edge coordinates (x1, y1 exclusive: a one-pixel item at (x, y) has box
    (x, y, x + 1, y + 1)), ``mask`` (H, W) bool its visible pixels."""

    label: int
    box: tuple[float, float, float, float]
    mask: np.ndarray


@dataclass
class Scene:
    """``image`` (H, W) uint8 grey; ``semantic`` (H, W) uint8: 0 background, c + 1 where an
    item of class c is visible; ``instances`` in drawing order (later ones on top)."""

    image: np.ndarray
    semantic: np.ndarray
    instances: list[Instance] = field(default_factory=list)


# ----------------------------------------------------------------------------- item pools

@functools.lru_cache(maxsize=4)
def _fashion_pool(directory: str, split: str) -> ItemPool:
    data = fm.FashionMNIST(directory, split, img_size=ITEM_SIDE)
    return ItemPool(data.images.numpy(), data.labels.numpy(), fm.CLASSES, "fashion_mnist")


def _shape_masks(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(10, N, S, S) bool: every shape class drawn at rotated coordinates u, v (N, S, S) in
    half-sides and radius r (N, 1, 1)."""
    d = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    arm = r / 3
    stripe = np.floor((v + r) / (2 * r / 5)).astype(np.int64) % 2 == 0  # five bands, three on
    return np.stack([
        d < r,                                                     # disc
        box < r * 0.85,                                            # square
        (v < r * 0.7) & (np.abs(u) < (v + r) * 0.6),               # triangle (pointing up)
        (d < r) & (d > r * 0.55),                                  # ring
        ((np.abs(u) < arm) | (np.abs(v) < arm)) & (box < r),       # cross
        (box < r * 0.9) & stripe,                                  # bars
        np.abs(u) + np.abs(v) < r * 1.1,                           # diamond
        (box < r * 0.9) & (box > r * 0.55),                        # frame
        (d < r) & (np.hypot(u - r * 0.45, v) > r * 0.75),          # crescent
        (d < r) & (v > -r * 0.15),                                 # half-disc
    ])


@functools.lru_cache(maxsize=4)
def shape_pool(split: str, per_class: int) -> ItemPool:
    """Generated shapes, ``per_class`` variants of each of the 10 :data:`SHAPES` (random size,
    tilt, offset, intensity, gradient and noise); the two splits draw different variants."""
    rng = np.random.default_rng([SHAPE_POOL_SEED, SPLIT_STREAMS[split]])
    n = per_class * len(SHAPES)
    labels = np.arange(n, dtype=np.int64) % len(SHAPES)
    axis = (np.arange(ITEM_SIDE) + 0.5) / ITEM_SIDE * 2 - 1  # pixel centres in [-1, 1]
    yy, xx = np.meshgrid(axis, axis, indexing="ij")  # (S, S)
    col = lambda a: a[:, None, None]  # (N,) -> (N, 1, 1)  # noqa: E731
    tilt = col(rng.uniform(-SHAPE_TILT, SHAPE_TILT, n))
    cx, cy = (col(rng.uniform(-0.08, 0.08, n)) for _ in range(2))
    x, y = xx - cx, yy - cy  # (N, S, S)
    u = np.cos(tilt) * x + np.sin(tilt) * y
    v = -np.sin(tilt) * x + np.cos(tilt) * y
    masks = _shape_masks(u, v, col(rng.uniform(*SHAPE_RADIUS, n)))  # (10, N, S, S)
    mask = masks[labels, np.arange(n)]  # (N, S, S)
    angle = col(rng.uniform(0, 2 * math.pi, n))
    amplitude, noise = SHAPE_TEXTURE
    texture = (col(rng.uniform(*SHAPE_INTENSITY, n))
               + amplitude * (np.cos(angle) * xx + np.sin(angle) * yy)
               + noise * rng.standard_normal((n, ITEM_SIDE, ITEM_SIDE)))
    images = np.where(mask, np.clip(texture, SHAPE_INTENSITY[0] - amplitude, MAX_INTENSITY), 0)
    return ItemPool(images.astype(np.uint8), labels, SHAPES, "shapes")


@functools.lru_cache(maxsize=None)
def _warn_no_fashion_mnist(searched: str) -> None:  # once per process
    log.warning(f"Fashion-MNIST not found ({searched}); scenes use generated shapes instead "
                "(data.scene_source=shapes; install Fashion-MNIST or set data.root for its items)")


def item_pool(source: str, split: str, root: Optional[str | Path] = None,
              shapes_per_class: int = SceneOptions.shapes_per_class) -> ItemPool:
    """The items of ``split`` (train | test) for ``source`` (fashion_mnist | shapes | auto:
    Fashion-MNIST when :func:`~.fashion_mnist.find_fashion_mnist` finds it, else shapes with
    one warning). ``fashion_mnist`` not found is a :class:`MissingFileError`."""
    if split not in SPLIT_STREAMS:
        raise ConfigError(f"invalid split {split!r} for scenes; allowed: "
                          f"{', '.join(SPLIT_STREAMS)}")
    if source not in SOURCES:
        raise ConfigError(f"invalid scene source {source!r}; allowed: {', '.join(SOURCES)}")
    if source != "shapes":
        try:
            return _fashion_pool(str(fm.find_fashion_mnist(root)), split)
        except MissingFileError:
            if source == "fashion_mnist":
                raise
            _warn_no_fashion_mnist(", ".join(map(str, fm.candidate_dirs(root))))
    return shape_pool(split, shapes_per_class)


# ----------------------------------------------------------------------------- rendering

@functools.lru_cache(maxsize=8)
def _grid(canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x), each (canvas, canvas) float32."""
    axis = np.arange(canvas, dtype=np.float32)
    return np.meshgrid(axis, axis, indexing="ij")


def _background(rng: np.random.Generator, opts: SceneOptions) -> np.ndarray:
    """(H, W) float32 intensities in ``opts.background``: smooth noise plus oriented stripes."""
    s, cells = opts.canvas, opts.noise_cells
    coarse = rng.random((cells + 1, cells + 1), dtype=np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((s, s), Image.BILINEAR))
    yy, xx = _grid(s)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(*opts.stripe_period)
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin((math.cos(angle) * xx + math.sin(angle) * yy)
                                 * (2 * math.pi / period) + phase)
    lo, hi = opts.background
    share = opts.stripe_share
    return lo + (hi - lo) * ((1 - share) * smooth + share * stripes)


def _place(rng: np.random.Generator, side: int, canvas: int, min_inside: float) -> int:
    """Top-left coordinate of an item of ``side`` px along one axis, with at least
    ``min_inside`` of its side on the canvas."""
    inside = min(side, math.ceil(min_inside * side))
    return int(rng.integers(inside - side, canvas - inside + 1))


def render_scene(index: int, seed: int, opts: SceneOptions, items: ItemPool,
                 split: str = "train") -> Scene:
    """Scene ``index`` of the stream ``(seed, split)``, the same on every call (its own
    generator). ``items`` is the split's :class:`ItemPool`."""
    rng = np.random.default_rng([seed % 2 ** 63, SPLIT_STREAMS[split], index])
    s = opts.canvas
    image = _background(rng, opts)  # (H, W) float32
    owner = np.full((s, s), -1, dtype=np.int16)  # (H, W): which item is on top, -1 none
    drawn = []  # per item: (label, rows, cols, pixels (h, w) float32, mask (h, w) bool)
    for k in range(int(rng.integers(opts.items[0], opts.items[1] + 1))):
        pick = int(rng.integers(len(items.labels)))
        side = max(1, round(ITEM_SIDE * rng.uniform(*opts.scale)))
        source = Image.fromarray(items.images[pick])
        if rng.random() < 0.5:
            source = source.transpose(Image.FLIP_LEFT_RIGHT)
        resized = np.asarray(source.resize((side, side), Image.BILINEAR))  # (side, side) uint8
        x0, y0 = _place(rng, side, s, opts.min_inside), _place(rng, side, s, opts.min_inside)
        gain = rng.uniform(*opts.gain)
        rows = slice(max(y0, 0), min(y0 + side, s))
        cols = slice(max(x0, 0), min(x0 + side, s))
        crop = resized[rows.start - y0:rows.stop - y0, cols.start - x0:cols.stop - x0]
        mask = crop > opts.threshold  # (h, w)
        owner[rows, cols][mask] = k
        pixels = np.minimum(crop.astype(np.float32) * gain, MAX_INTENSITY)
        drawn.append((int(items.labels[pick]), rows, cols, pixels, mask))
    semantic = np.zeros((s, s), dtype=np.uint8)
    instances = []
    for k, (label, rows, cols, pixels, _) in enumerate(drawn):
        visible = owner[rows, cols] == k  # (h, w); later items' pixels already excluded
        if int(visible.sum()) < opts.min_visible:
            continue  # too little left: neither an instance nor drawn (background shows)
        image[rows, cols][visible] = pixels[visible]
        semantic[rows, cols][visible] = label + 1
        full = np.zeros((s, s), dtype=bool)
        full[rows, cols] = visible
        ys, xs = np.nonzero(visible)
        box = (float(cols.start + xs.min()), float(rows.start + ys.min()),
               float(cols.start + xs.max() + 1), float(rows.start + ys.max() + 1))
        instances.append(Instance(label, box, full))
    if opts.pixel_noise > 0:
        image = image + rng.normal(0.0, opts.pixel_noise, image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, MAX_INTENSITY).astype(np.uint8)
    return Scene(image, semantic, instances)


class SceneDataset(Dataset):
    """``num_images`` scenes of ``split`` (train | test): item ``i`` is
    ``render_scene(i, seed, opts, pool, split)``, a :class:`Scene`. Train and test use disjoint
    seed streams and item pools. ``classes`` = ("background", *the 10 item classes),
    ``num_classes`` = 11; ``source`` is the pool actually used (auto resolved)."""

    def __init__(self, num_images: int, split: str = "train", seed: int = 0,
                 opts: SceneOptions = SceneOptions(), root: Optional[str | Path] = None):
        if num_images < 1:
            raise ConfigError(f"invalid number of scenes {num_images}; expected >= 1")
        self.items = item_pool(opts.source, split, root, opts.shapes_per_class)
        self.num_images, self.split, self.seed, self.opts = num_images, split, seed, opts
        self.classes = ("background", *self.items.classes)
        self.num_classes = len(self.classes)
        self.source = self.items.source

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Scene:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"scene {index} of {self.num_images}")
        return render_scene(index % self.num_images, self.seed, self.opts, self.items, self.split)


__all__ = ["ITEM_SIDE", "Instance", "ItemPool", "SHAPES", "SOURCES", "Scene", "SceneDataset",
           "SceneOptions", "item_pool", "render_scene", "shape_pool"]
