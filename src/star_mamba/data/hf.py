"""``data.name=hf``: an image classification dataset saved with Hugging Face ``datasets``
(``DatasetDict.save_to_disk(ROOT)``, or one ``Dataset.save_to_disk(ROOT/<split>)`` per split).

Items are ``(transform(image), label)`` from an image column and a label column (names set by
``data.image_column`` and ``data.label_column``). Images are decoded here from their stored
bytes (an ``Image`` feature, read with ``decode=False``) or converted from arrays, with the
ImageFolder reader's conversion to 8-bit RGB, and an unreadable one is replaced by the next
readable item and reported as ImageFolder's are (``folder.FallbackReads``). Class names come
from a ``ClassLabel`` label feature, else ``0..max label``. Random access, so every task and
the map-style sampler read it as they read an ImageFolder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, UserError
from .folder import FallbackReads, decode_rgb, load_rgb, to_rgb

INSTALL_HINT = "pip install 'star-mamba[hf]' (or pip install datasets)"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.name=hf needs the datasets package: {INSTALL_HINT}") from None
    return datasets


def load_hf_split(root: str | Path, split: str):
    """The ``split`` of the dataset saved under ``root``: a saved DatasetDict holding it, or a
    saved Dataset at ``root/split``. Anything else raises one line naming what is missing."""
    datasets = _datasets()
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data.root={root} does not exist (data.name=hf reads a dataset saved "
                          "with datasets' save_to_disk)")
    try:
        saved = datasets.load_from_disk(str(root))
    except FileNotFoundError:
        saved = None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise ConfigError(f"split {split!r} is not in the dataset at {root} (splits: "
                              f"{', '.join(saved)}); set data.split / data.eval_split")
        return saved[split]
    if (root / split).is_dir():
        try:
            part = datasets.load_from_disk(str(root / split))
        except FileNotFoundError:
            part = None
        if isinstance(part, datasets.Dataset):
            return part
    what = "a single Dataset, not a DatasetDict" if saved is not None else "not a saved dataset"
    raise ConfigError(f"data.root={root} is {what} with a split {split!r}: expected "
                      f"DatasetDict.save_to_disk(ROOT) or Dataset.save_to_disk(ROOT/{split})")


class HFImages(FallbackReads, Dataset):
    """One split of a saved Hugging Face dataset as ``(image, label)`` items."""

    def __init__(self, dataset, image_column: str = "image", label_column: str = "label",
                 transform: Optional[Callable] = None, max_bad_fraction: float = 0.01,
                 where: str = "the dataset"):
        datasets = _datasets()
        for option, column in (("image_column", image_column), ("label_column", label_column)):
            if column not in dataset.column_names:
                raise ConfigError(f"data.{option}={column!r} is not a column of {where} "
                                  f"(columns: {', '.join(dataset.column_names)})")
        if len(dataset) == 0:
            raise ConfigError(f"{where} holds no rows")
        feature = dataset.features[image_column]
        if isinstance(feature, datasets.Image):  # keep the bytes: decoded (and judged) here
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.transform, self.max_bad_fraction, self.where = transform, max_bad_fraction, where
        self.bad: dict[str, str] = {}
        self.targets = [int(y) for y in dataset[label_column]]
        label_feature = dataset.features[label_column]
        names = getattr(label_feature, "names", None)
        self.classes = list(names) if names else [str(i) for i in range(max(self.targets) + 1)]

    def __len__(self) -> int:
        return len(self.dataset)

    def _name(self, index: int) -> str:
        return f"{self.where}[{index}]"

    def _read(self, index: int) -> tuple[Image.Image, int]:
        row = self.dataset[index]
        return to_pil(row[self.image_column]), int(row[self.label_column])


def to_pil(value: Any) -> Image.Image:
    """An image column's value as 8-bit RGB: stored bytes or path (``Image(decode=False)``), a
    PIL image, or an (H, W[, C]) array."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_rgb(value["bytes"])
        if value.get("path"):
            return load_rgb(value["path"])
        raise ValueError("the image holds neither bytes nor a path")
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if value is None:
        raise ValueError("no image (None)")
    return to_rgb(Image.fromarray(np.asarray(value)))


def build_hf_images(root: str | Path, split: str, transform: Optional[Callable] = None,
                    image_column: str = "image", label_column: str = "label",
                    max_bad_fraction: float = 0.01) -> HFImages:
    """``split`` of the dataset saved under ``root``, read as ``(transform(image), label)``."""
    return HFImages(load_hf_split(root, split), image_column, label_column, transform,
                    max_bad_fraction, where=f"{root} ({split})")


__all__ = ["HFImages", "build_hf_images", "load_hf_split", "to_pil"]
