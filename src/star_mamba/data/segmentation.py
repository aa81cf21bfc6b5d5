"""Semantic segmentation datasets: items ``(image, mask)`` after a joint transform
(:mod:`.seg_transforms`): image (C, H, W) float normalised, mask (H, W) int64 with
``ignore_index`` (255 by default) on ignored pixels.

    SceneSegmentation(scenes, transform)   the built-in scenes (1 channel), semantic maps
    SegmentationFolder(pairs, classes, ...)  (image file, mask PNG) pairs
    build_ade20k(root, split, ...)         ADEChallengeData2016: 150 classes, zero label reduced
    build_seg_folder(root, split, ...)     images/<split>/, masks/<split>/, classes.txt

Files: images are read with :func:`~.folder.load_rgb` (grey, RGBA, palette -> RGB); a mask is
a PNG holding 8-bit labels (a palette PNG's indices, an ``L`` image as is; RGB masks are
refused). An unreadable image or mask is skipped like an unreadable ImageFolder image
(:class:`~.folder.FallbackReads`: replaced by the next readable pair, named, counted against
``data.max_bad_fraction``, reported through :func:`~.folder.collect_unreadable` in training).
A readable mask that does not fit its image (another size, labels outside the classes that are
not ``ignore_index``, RGB) is a :class:`DataError` naming the file: the data is wrong, and
skipping it would hide that.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, MissingFileError
from .folder import FallbackReads, load_rgb, printable, walk_once
from .scenes import SceneDataset

log = logging.getLogger("star_mamba")

IGNORE_INDEX = 255  # the label of ignored pixels (mmseg's)
LABEL_VALUES = 256  # an 8-bit mask's possible values
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
MASK_EXTENSIONS = (".png",)
MASK_MODES = ("L", "P", "1")  # 8-bit labels: grey values, palette indices, bilevel
ADE_SPLITS = {"training": "training", "validation": "validation", "train": "training",
              "val": "validation"}
ADE_LAYOUT = "ADEChallengeData2016/{images,annotations}/{training,validation}/"
SEG_FOLDER_LAYOUT = "root/images/<split>/*, root/masks/<split>/*.png and root/classes.txt"

# The 150 ADE20K (SceneParsing) classes, in label order (label 1 is wall: 0 after reduction).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")


def label_table(num_classes: int, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """(256,) uint8 lookup: raw mask value -> label. ``reduce_zero_label`` (mmseg's): 0 and
    255 -> ``ignore_index``, v -> v - 1; else values as they are (``ignore_index`` stays)."""
    table = np.arange(LABEL_VALUES, dtype=np.int64)
    if reduce_zero_label:
        table = table - 1
        table[[0, IGNORE_INDEX]] = ignore_index
    return table.astype(np.uint8)


def allowed_values(num_classes: int, reduce_zero_label: bool, ignore_index: int) -> np.ndarray:
    """(256,) bool: the raw mask values that are a class or ignored."""
    ok = np.zeros(LABEL_VALUES, dtype=bool)
    if reduce_zero_label:  # raw 0 and 255 are ignored, 1..num_classes are the classes
        ok[:num_classes + 1] = ok[IGNORE_INDEX] = True
    else:
        ok[:num_classes] = ok[ignore_index] = True
    return ok


def check_ignore_index(ignore_index: int, num_classes: int) -> None:
    if not num_classes <= ignore_index < LABEL_VALUES:
        raise ConfigError(f"invalid config: data.ignore_index={ignore_index}; expected a value "
                          f"in {num_classes}..{LABEL_VALUES - 1} (not one of the {num_classes} "
                          "class labels)")


class SceneSegmentation(Dataset):
    """The scenes of a :class:`~.scenes.SceneDataset` as (image (1, H, W), semantic (H, W))
    after ``transform(PIL grey image, uint8 semantic map)``; classes: background + 10."""

    def __init__(self, scenes: SceneDataset, transform: Optional[Callable] = None):
        self.scenes, self.transform = scenes, transform
        self.classes = scenes.classes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        scene = self.scenes[index]
        image = Image.fromarray(scene.image, mode="L")
        if self.transform is None:
            return image, scene.semantic
        return self.transform(image, scene.semantic)


class SegmentationFolder(FallbackReads, Dataset):
    """``(image path, mask path)`` pairs as ``transform(RGB PIL image, (H, W) uint8 labels)``
    (no transform: the pair itself). Raw mask values are mapped by :func:`label_table`; values
    outside the ``classes`` range (after ``reduce_zero_label``) that are not ``ignore_index``
    are a :class:`DataError`, as are a mask of another size than its image and an RGB mask."""

    def __init__(self, pairs: Sequence[tuple[str, str]], classes: Sequence[str],
                 transform: Optional[Callable] = None, reduce_zero_label: bool = False,
                 ignore_index: int = IGNORE_INDEX, max_bad_fraction: float = 0.01,
                 where: str = "segmentation folder"):
        if not pairs:
            raise MissingFileError(f"{where} holds no (image, mask) pairs")
        check_ignore_index(ignore_index, len(classes))
        self.pairs = [(str(i), str(m)) for i, m in pairs]
        self.classes = tuple(classes)
        self.pair_transform = transform
        self.transform = None  # FallbackReads' own: the pair is transformed jointly below
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index
        self.max_bad_fraction, self.where = max_bad_fraction, where
        self.bad: dict[str, str] = {}  # image path -> reason, in this process
        self._table = label_table(len(self.classes), reduce_zero_label, ignore_index)
        self._allowed = allowed_values(len(self.classes), reduce_zero_label, ignore_index)

    def __len__(self) -> int:
        return len(self.pairs)

    def _name(self, index: int) -> str:
        return self.pairs[index][0]

    def _read(self, index: int):
        """(RGB image, (decoded mask, index)); raises on an undecodable image or mask."""
        image_path, mask_path = self.pairs[index]
        image = load_rgb(image_path)
        try:
            with open(mask_path, "rb") as f:
                mask = Image.open(f)
                mask.load()
        except Exception as e:
            raise OSError(f"mask {mask_path}: {type(e).__name__}: {e}") from e
        return image, (mask, index)

    def __getitem__(self, index: int):
        image, (mask, i) = super().__getitem__(index)  # unreadable pairs skipped there
        labels = self.labels(mask, image.size, i)
        if self.pair_transform is None:
            return image, labels
        return self.pair_transform(image, labels)

    def labels(self, mask: Image.Image, size: tuple[int, int], index: int) -> np.ndarray:
        """The decoded mask of pair ``index`` as (H, W) uint8 labels, checked against its image
        (``size`` = (W, H))."""
        path = printable(self.pairs[index][1])
        if mask.mode not in MASK_MODES:
            kind = "colours, not labels" if mask.mode.startswith("RGB") else "not 8-bit labels"
            raise DataError(f"mask {path} is a {mask.mode} image ({kind}); expected an 8-bit "
                            "label PNG (mode L or P: one class index per pixel)")
        if mask.size != size:
            raise DataError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image "
                            f"{printable(self.pairs[index][0])} is {size[0]}x{size[1]}")
        raw = np.asarray(mask, dtype=np.uint8)  # (H, W): grey values or palette indices
        present = np.bincount(raw.ravel(), minlength=LABEL_VALUES) > 0
        bad = np.flatnonzero(present & ~self._allowed)
        if len(bad):
            top = len(self.classes) if self.reduce_zero_label else len(self.classes) - 1
            shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
            ignored = IGNORE_INDEX if self.reduce_zero_label else self.ignore_index
            raise DataError(f"mask {path} holds labels {shown} outside 0..{top} (classes of "
                            f"{self.where}) that are not the ignore value {ignored}")
        return self._table[raw]


def _files(directory: Path, extensions: tuple[str, ...]) -> dict[str, str]:
    """Files under ``directory`` (each directory once, :func:`walk_once`) by relative path
    without extension -> path."""
    found = {}
    for root, _, files in sorted(walk_once(str(directory))):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in extensions:
                key = os.path.relpath(os.path.join(root, stem), directory)
                found.setdefault(key, os.path.join(root, name))
    return found


def match_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[str, str]]:
    """(image, mask) pairs matched by relative path and stem, sorted; images without a mask
    and masks without an image are one warning line each with their count (first named)."""
    images, masks = _files(images_dir, IMAGE_EXTENSIONS), _files(masks_dir, MASK_EXTENSIONS)
    for what, missing, other in (("images", images.keys() - masks.keys(), masks_dir),
                                 ("masks", masks.keys() - images.keys(), images_dir)):
        if missing:
            first = printable((images if what == "images" else masks)[min(missing)])
            log.warning(f"{len(missing)} {what} without a match in {printable(str(other))} "
                        f"skipped (first: {first})")
    return [(images[k], masks[k]) for k in sorted(images.keys() & masks.keys())]


def _need_dir(directory: Path, layout: str) -> None:
    if not directory.is_dir():
        raise MissingFileError(f"segmentation data: {printable(str(directory))} does not exist "
                               f"(expected {layout})")


def build_ade20k(root: str | Path, split: str = "training", transform: Optional[Callable] = None,
                 reduce_zero_label: bool = True, ignore_index: int = IGNORE_INDEX,
                 max_bad_fraction: float = 0.01) -> SegmentationFolder:
    """ADEChallengeData2016 at ``root``: ``images/<split>/*.jpg`` with
    ``annotations/<split>/*.png``, split ``training`` | ``validation`` (or ``train`` | ``val``);
    150 classes (:data:`ADE20K_CLASSES`), label 0 ("other") ignored by ``reduce_zero_label``."""
    if split not in ADE_SPLITS:
        raise ConfigError(f"invalid split {split!r} for ade20k; allowed: "
                          f"{', '.join(ADE_SPLITS)}")
    root, split = Path(root), ADE_SPLITS[split]
    images_dir, masks_dir = root / "images" / split, root / "annotations" / split
    for directory in (images_dir, masks_dir):
        _need_dir(directory, ADE_LAYOUT)
    return SegmentationFolder(match_pairs(images_dir, masks_dir), ADE20K_CLASSES, transform,
                              reduce_zero_label, ignore_index, max_bad_fraction,
                              where=f"ade20k {printable(str(root))} split {split!r}")


def read_classes(path: Path) -> tuple[str, ...]:
    """One class name per line (index = line number; blank trailing lines dropped)."""
    if not path.is_file():
        raise MissingFileError(f"segmentation folder: {printable(str(path))} is missing (one "
                               "class name per line, label = line number, 0 first)")
    names = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while names and not names[-1].strip():
        names.pop()
    if not names:
        raise DataError(f"{printable(str(path))} names no classes")
    return tuple(n.strip() for n in names)


def build_seg_folder(root: str | Path, split: str = "train", transform: Optional[Callable] = None,
                     reduce_zero_label: bool = False, ignore_index: int = IGNORE_INDEX,
                     max_bad_fraction: float = 0.01) -> SegmentationFolder:
    """``root/images/<split>/*`` with ``root/masks/<split>/*.png`` (matched by stem) and
    ``root/classes.txt``; mask values are class indices (``reduce_zero_label``: 0 ignored,
    v -> v - 1) and ``ignore_index``."""
    root = Path(root)
    images_dir, masks_dir = root / "images" / split, root / "masks" / split
    for directory in (images_dir, masks_dir):
        _need_dir(directory, SEG_FOLDER_LAYOUT)
    classes = read_classes(root / "classes.txt")
    return SegmentationFolder(match_pairs(images_dir, masks_dir), classes, transform,
                              reduce_zero_label, ignore_index, max_bad_fraction,
                              where=f"seg_folder {printable(str(root))} split {split!r}")


__all__ = ["ADE20K_CLASSES", "IGNORE_INDEX", "SceneSegmentation", "SegmentationFolder",
           "allowed_values", "build_ade20k", "build_seg_folder", "label_table", "match_pairs",
           "read_classes"]
