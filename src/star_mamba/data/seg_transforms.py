"""Joint (image, mask) transforms of the mmseg ADE20K recipe, in numpy, PIL and torch.

Both take a PIL image (mode ``L`` or ``RGB``) and its label mask, an (H, W) uint8 array whose
ignored pixels already hold ``ignore_index``, and return ``(image, mask)``: image (C, h, w)
float32 normalised with ``mean`` / ``std`` (per channel, in [0, 1] units), mask (h, w) int64.

Training (:class:`SegTrainTransform`): random keep-ratio resize, random crop keeping the most
frequent class under ``cat_max_ratio``, horizontal flip, photometric distortion, normalise,
pad to the crop size (image with 0 after normalisation, mask with ``ignore_index``). Every
random draw is from **numpy's global generator** (``np.random``), which the training sampler
reseeds before each item (``engine.sampler.SeededDataset``), so a sample's augmentation is
replayed exactly. Images are resized bilinearly (PIL), masks by nearest neighbour.

Evaluation (:class:`SegEvalTransform`): an optional keep-ratio resize of the image only; the
mask stays at its original size, where the metrics are computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CROP_TRIES = 10  # random crops tried to keep the most frequent class under cat_max_ratio
BRIGHTNESS_DELTA = 32.0  # photometric: brightness shift range (intensity units, either way)
CONTRAST_RANGE = (0.5, 1.5)  # photometric: contrast factor range
SATURATION_RANGE = (0.5, 1.5)  # photometric: saturation factor range (RGB only)
HUE_DELTA = 18  # photometric: hue shift range in OpenCV units (180 = a full turn; RGB only)
HUE_TURN = 180.0  # OpenCV's hue units per turn
PIL_HUE_TURN = 256  # PIL's HSV hue units per turn
MAX_INTENSITY = 255.0


def keep_ratio_size(width: int, height: int, scale: Sequence[float]) -> tuple[int, int]:
    """(width, height) rescaled by one factor so that the long side fits ``max(scale)`` and
    the short side ``min(scale)`` (mmcv's ``rescale_size``), rounded to the nearest pixel."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def _normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(H, W, C) float32 in 0..255 -> (C, H, W) float32 tensor, (x / 255 - mean) / std."""
    channels = image.shape[2]
    mean_ = np.asarray(tuple(mean) * (channels // len(mean)), dtype=np.float32)
    std_ = np.asarray(tuple(std) * (channels // len(std)), dtype=np.float32)
    if mean_.shape != (channels,) or std_.shape != (channels,):
        raise ValueError(f"mean/std of {len(mean)} channels for an image of {channels}")
    x = (image / np.float32(MAX_INTENSITY) - mean_) / std_
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))


def _as_array(image: Image.Image) -> np.ndarray:
    """A PIL image (L or RGB) -> (H, W, C) uint8."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    arr = np.asarray(image)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _check_pair(image: Image.Image, mask: np.ndarray) -> None:
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask of shape {mask.shape} for an image of {image.height}x{image.width}")


@dataclass
class SegTrainTransform:
    """mmseg's ADE20K training pipeline (see the module docstring).

    ``base_scale`` (long, short) with ``ratio_range``: the image is resized by one factor to fit
    ``base_scale * r``, r drawn uniformly from ``ratio_range``; ``base_scale`` None: scaled by
    r itself. Then a ``crop_size`` square crop (up to :data:`CROP_TRIES` tries for one whose most
    frequent class, ignore excluded, covers less than ``cat_max_ratio`` of its labelled pixels;
    the last try is kept otherwise; 1 disables the check), a flip with ``flip_prob``, and with
    ``photometric`` mmseg's PhotoMetricDistortion: brightness, contrast (before or after the
    colour steps, at random), and for RGB saturation and hue, each applied with probability 0.5.
    """

    crop_size: int
    base_scale: Optional[tuple[int, int]] = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop_size={self.crop_size}: expected >= 1")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range={tuple(self.ratio_range)}: expected 0 < min <= max")
        if not 0 < self.cat_max_ratio <= 1 or not 0 <= self.flip_prob <= 1:
            raise ValueError("cat_max_ratio in (0, 1] and flip_prob in [0, 1] expected")

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        _check_pair(image, mask)
        image, mask = self.resize(image, mask)
        img = _as_array(image)  # (H, W, C) uint8
        img, mask = self.crop(img, mask)
        if np.random.random_sample() < self.flip_prob:
            img, mask = img[:, ::-1], mask[:, ::-1]
        pixels = img.astype(np.float32)
        if self.photometric:
            pixels = photometric_distortion(pixels)
        x = _normalise(pixels, self.mean, self.std)  # (C, h, w)
        target = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))  # (h, w)
        return self.pad(x, target)

    def resize(self, image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        lo, hi = self.ratio_range
        ratio = np.random.random_sample() * (hi - lo) + lo
        if self.base_scale is None:
            size = (max(1, int(image.width * ratio + 0.5)), max(1, int(image.height * ratio + 0.5)))
        else:
            size = keep_ratio_size(image.width, image.height,
                                   [s * ratio for s in self.base_scale])
        if size == image.size:
            return image, mask
        resized = Image.fromarray(mask).resize(size, Image.NEAREST)
        return image.resize(size, Image.BILINEAR), np.asarray(resized)

    def _window(self, height: int, width: int) -> tuple[int, int]:
        top = np.random.randint(0, max(height - self.crop_size, 0) + 1)
        left = np.random.randint(0, max(width - self.crop_size, 0) + 1)
        return top, left

    def crop(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A random ``crop_size`` window (smaller where the image is) of (H, W, C) and (H, W)."""
        c = self.crop_size
        top, left = self._window(*mask.shape)
        if self.cat_max_ratio < 1:
            for _ in range(CROP_TRIES):
                counts = np.bincount(mask[top:top + c, left:left + c].ravel(), minlength=256)
                counts[self.ignore_index] = 0
                kept = counts[counts > 0]
                if len(kept) > 1 and kept.max() / kept.sum() < self.cat_max_ratio:
                    break
                top, left = self._window(*mask.shape)
        return img[top:top + c, left:left + c], mask[top:top + c, left:left + c]

    def pad(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Pad bottom and right to ``crop_size``: image with 0, mask with ``ignore_index``."""
        c = self.crop_size
        h, w = target.shape
        if (h, w) == (c, c):
            return x, target
        image = x.new_zeros((x.shape[0], c, c))
        image[:, :h, :w] = x
        mask = target.new_full((c, c), self.ignore_index)
        mask[:h, :w] = target
        return image, mask


def photometric_distortion(pixels: np.ndarray) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on (H, W, C) float32 in 0..255 (numpy's global generator):
    brightness; then contrast first or last (at random); saturation and hue for C = 3. Each
    step is applied with probability 0.5; values are clipped to 0..255 after each."""
    def coin() -> bool:
        return bool(np.random.randint(2))

    def clip(x):
        return np.clip(x, 0, MAX_INTENSITY, out=x)

    if coin():
        pixels = clip(pixels + np.float32(np.random.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)))
    contrast_first = coin()
    if contrast_first and coin():
        pixels = clip(pixels * np.float32(np.random.uniform(*CONTRAST_RANGE)))
    if pixels.shape[2] == 3:
        saturate, hue = coin(), coin()
        if saturate or hue:
            hsv = np.asarray(Image.fromarray(pixels.astype(np.uint8), "RGB").convert("HSV"))
            hsv = hsv.astype(np.int32)
            if saturate:
                factor = np.random.uniform(*SATURATION_RANGE)
                hsv[..., 1] = np.clip(hsv[..., 1] * factor, 0, MAX_INTENSITY)
            if hue:
                shift = np.random.randint(-HUE_DELTA, HUE_DELTA + 1) / HUE_TURN * PIL_HUE_TURN
                hsv[..., 0] = (hsv[..., 0] + int(round(shift))) % PIL_HUE_TURN
            rgb = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
            pixels = np.asarray(rgb).astype(np.float32)
    if not contrast_first and coin():
        pixels = clip(pixels * np.float32(np.random.uniform(*CONTRAST_RANGE)))
    return pixels


@dataclass
class SegEvalTransform:
    """Evaluation: the image resized by one factor to fit ``base_scale`` (long, short; mmseg's
    test ``Resize(scale, keep_ratio=True)``; None: kept as is) and normalised; the mask is kept
    at the original size (the evaluator resizes logits to it)."""

    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    base_scale: Optional[tuple[int, int]] = None

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        _check_pair(image, mask)
        if self.base_scale is not None:
            size = keep_ratio_size(image.width, image.height, self.base_scale)
            if size != image.size:
                image = image.resize(size, Image.BILINEAR)
        x = _normalise(_as_array(image).astype(np.float32), self.mean, self.std)
        return x, torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))


__all__ = ["CROP_TRIES", "SegEvalTransform", "SegTrainTransform", "keep_ratio_size",
           "photometric_distortion"]
