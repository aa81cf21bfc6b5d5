"""ImageFolder datasets (ImageNet's train/ and val/ layout) that survive real-world files.

Valid but odd images (greyscale, RGBA, palette, 16-bit, tiny) are converted to 8-bit RGB;
unreadable ones (truncated, not an image, empty, no permission) are skipped and the next
readable image (next index) is returned in their place. Empty class directories are allowed.
A directory symlink that leads back to a directory already read (a loop such as
``b/self -> .``) is skipped with one log line, so each file is read once; file names that are
not valid UTF-8 are shown with their odd bytes escaped (``bad\\xff.png``, :func:`printable`).

Who counts the unreadable images: on its own, the dataset counts them in its process, names
them in the log and stops once more than ``max_bad_fraction`` of the dataset is broken. In
training, DataLoader workers each hold a copy of the dataset, so per-process counts would
undercount; there the training set is read inside :func:`collect_unreadable`, under which index
``i`` reports its own file ``samples[i]`` when it is unreadable (whether found now or known
from before) and judges nothing: each bad file is reported once per epoch, by whichever worker
and rank loads its index, and the training loop sums the reports over workers and ranks and
applies ``data.max_bad_fraction`` (``engine.trainer.BadImages``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import has_file_allowed_extension

from ..errors import MissingFileError, UnreadableImagesError

log = logging.getLogger("star_mamba")


def printable(text: str) -> str:
    """``text`` safe to write to any log or terminal: the bytes of a file name that are not valid
    UTF-8 (which ``os.fsdecode`` keeps as surrogate escapes) shown as ``\\xNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def walk_once(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top, followlinks=True)`` that does not enter a directory it has entered already
    (by real path): a symlink loop (``b/self -> .``) or a second link to a directory read
    elsewhere in ``top`` is skipped and named in one log line."""
    entered = {os.path.realpath(top)}
    for root, dirs, files in os.walk(top, followlinks=True):
        kept = []
        for name in sorted(dirs, key=lambda d: os.path.islink(os.path.join(root, d))):
            real = os.path.realpath(os.path.join(root, name))
            if real in entered:
                log.warning(f"skipping directory link {printable(os.path.join(root, name))} -> "
                            f"{printable(real)}: a directory already read (a symlink loop, or a second "
                            "link to it)")
            else:
                entered.add(real)
                kept.append(name)
        dirs[:] = kept  # os.walk enters only these
        yield root, dirs, files


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB; raises on a broken file."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


def decode_rgb(data: bytes) -> Image.Image:
    """:func:`load_rgb` for an encoded image held in memory (a shard's or a dataset's bytes)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image of any mode as 8-bit RGB: 16/32-bit grey rescaled, transparency
    composited on black, palette and grey expanded."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: rescale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


_reports: Optional[list[tuple[int, str, str]]] = None  # set by collect_unreadable


@contextlib.contextmanager
def collect_unreadable() -> Iterator[list[tuple[int, str, str]]]:
    """Within the block (in this process), :class:`SafeImageFolder` appends
    ``(index, path, reason)`` for each requested index whose own file is unreadable to the
    yielded list, and leaves logging and the ``max_bad_fraction`` limit to the caller."""
    global _reports
    outer, _reports = _reports, []
    try:
        yield _reports
    finally:
        _reports = outer


class FallbackReads:
    """Items ``(transform(image), target)`` that survive unreadable images: one whose image does
    not decode is recorded (logged and judged here, or collected, see
    :func:`collect_unreadable`) and replaced by the next readable item (next index).

    Subclasses give ``_name(index)`` (the file, for messages), ``_read(index)`` (``(RGB image,
    target)``, raising on a broken image), ``__len__``, ``transform``, ``max_bad_fraction``,
    ``where`` (the dataset, for messages) and ``bad = {}``."""

    bad: dict[str, str]  # name -> reason, in this process
    max_bad_fraction: float
    transform: Optional[Callable]
    where: str

    def _name(self, index: int) -> str:
        raise NotImplementedError

    def _read(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def __getitem__(self, index: int):
        n = len(self)
        for attempt in range(n):
            i = (index + attempt) % n
            name = self._name(i)
            if name not in self.bad:
                try:
                    img, target = self._read(i)
                except Exception as e:  # truncated, not an image, empty, unreadable, ...
                    self._record_bad(name, e)
                else:
                    if self.transform is not None:
                        img = self.transform(img)
                    return img, target
            if attempt == 0 and _reports is not None:  # this index's own file
                _reports.append((index, printable(name), self.bad[name]))
        raise UnreadableImagesError(f"no readable image in {self.where}")

    def _record_bad(self, name: str, error: Exception) -> None:
        reason = self.bad[name] = printable(f"{type(error).__name__}: {error}")
        if _reports is not None:  # collected: the caller counts, names and judges
            return
        name = printable(name)
        log.warning(f"skipping unreadable image {name} ({reason}); "
                    f"{len(self.bad)} skipped so far")
        if len(self.bad) > self.max_bad_fraction * len(self):
            raise UnreadableImagesError(
                f"{len(self.bad)} of {len(self)} images in {self.where} are unreadable, "
                f"more than data.max_bad_fraction={self.max_bad_fraction}; last: {name} "
                f"({reason})")


class SafeImageFolder(FallbackReads, ImageFolder):
    def __init__(self, root: str, transform: Optional[Callable] = None,
                 max_bad_fraction: float = 0.01):
        super().__init__(root, transform=transform, loader=load_rgb, allow_empty=True)
        if len(self.samples) == 0:
            raise MissingFileError(f"image folder {root} holds no images")
        self.max_bad_fraction, self.where = max_bad_fraction, str(root)
        self.bad: dict[str, str] = {}  # path -> reason, in this process

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions=None,
                     is_valid_file=None, allow_empty: bool = True) -> list[tuple[str, int]]:
        """torchvision's ``(path, class)`` list, in its order, with each directory entered once
        (:func:`walk_once`); empty classes are allowed."""
        valid = is_valid_file or (lambda path: has_file_allowed_extension(path, extensions))
        samples = []
        for name in sorted(class_to_idx):
            for root, _, files in sorted(walk_once(os.path.join(directory, name))):
                samples += [(os.path.join(root, f), class_to_idx[name]) for f in sorted(files)
                            if valid(os.path.join(root, f))]
        return samples

    def _name(self, index: int) -> str:
        return self.samples[index][0]

    def _read(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return load_rgb(path), target


def build_image_folder(root: str | Path, split: str = "train",
                       transform: Optional[Callable] = None,
                       max_bad_fraction: float = 0.01) -> SafeImageFolder:
    """``root/split/<class>/<image>``; a missing directory raises FileNotFoundError naming it."""
    directory = Path(root) / split
    if not directory.is_dir():
        raise MissingFileError(f"image folder {directory} does not exist (expected "
                                f"{Path(root)}/{split}/<class>/<images>)")
    return SafeImageFolder(str(directory), transform=transform, max_bad_fraction=max_bad_fraction)
