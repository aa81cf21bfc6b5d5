"""Semantic segmentation metrics and inference: confusion matrix, mIoU / mAcc / aAcc as
mmsegmentation reports them, and whole-image, sliding-window, multi-scale and flipped inference.

Metrics come only from the confusion matrix summed over every image (and every rank), never
from per-batch means, so they do not depend on the batch size or the number of processes.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..config import field_types, typed_values
from ..errors import ConfigError

MODES = ("whole", "slide")
SLIDE_STRIDE = 2 / 3  # default stride / crop (mmseg's ADE20K recipes: 341 for 512)


# ------------------------------------------------------------------------------ metrics

def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(K, K) int64 counts: row = true class, column = predicted class, pixels whose target is
    ``ignore_index`` left out. ``pred`` and ``target``: integer tensors of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "differ in shape")
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target labels {t.min().item()}..{t.max().item()} outside 0.."
                         f"{num_classes - 1} (and not ignore_index={ignore_index})")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def _nanmean(x: Tensor) -> float:
    keep = x[~torch.isnan(x)]
    return keep.mean().item() if keep.numel() else math.nan


def segmentation_metrics(conf: Tensor, classes: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """mmseg's metrics from a (K, K) confusion matrix (rows truth, columns prediction).

    Per class, with TP the diagonal: IoU = TP / (TP + FP + FN), NaN where that union is 0 (the
    class neither in the truth nor in the predictions); Acc = TP / (TP + FN), NaN where the
    class has no true pixel. A class only predicted, never true, has IoU 0 (it counts) and Acc
    NaN. ``mIoU`` / ``mAcc`` are the means over the non-NaN classes (mmseg's nanmean); ``aAcc``
    = all TP / all counted pixels. All in percent; ``per_class`` is a list of
    ``{"class", "IoU", "Acc"}`` (names from ``classes``, else the indices as strings).
    """
    conf = conf.detach().to("cpu", torch.float64)
    k = conf.shape[0]
    if conf.shape != (k, k):
        raise ValueError(f"a confusion matrix is square, got {tuple(conf.shape)}")
    if classes is not None and len(classes) != k:
        raise ValueError(f"{len(classes)} class names for {k} classes")
    tp = conf.diagonal()
    truth, predicted = conf.sum(1), conf.sum(0)
    union = truth + predicted - tp
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan) * 100
    acc = torch.where(truth > 0, tp / truth.clamp(min=1), nan) * 100
    total = conf.sum().item()
    names = list(classes) if classes is not None else [str(i) for i in range(k)]
    return dict(mIoU=_nanmean(iou), mAcc=_nanmean(acc),
                aAcc=100 * tp.sum().item() / total if total else math.nan,
                per_class=[dict(**{"class": n}, IoU=i.item(), Acc=a.item())
                           for n, i, a in zip(names, iou, acc)])


# ------------------------------------------------------------------------------ inference

@dataclass
class InferenceConfig:
    """How test images are predicted.

    ``whole``: the full image at once (padded right / bottom to a multiple of the patch);
    ``slide``: ``crop`` x ``crop`` windows every ``stride`` px, the last one in each direction
    aligned to the border, overlapping logits averaged (mmseg's slide inference). ``crop`` None
    = the model's ``cfg.img_size``; ``stride`` None = 2/3 of the crop, rounded down (512 -> 341).
    ``scales``: resize factors of multi-scale testing; ``flip``: add the horizontally flipped
    image. With several views (scales x flips) the softmax probabilities are averaged (as mmseg)
    and ``predict`` returns their log; with one view, the model's logits.
    """

    mode: Literal["whole", "slide"] = "whole"
    crop: Optional[int] = None
    stride: Optional[int] = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"invalid config: inference.{name}={getattr(self, name)!r}; {allowed}")

        if self.mode not in MODES:
            raise bad("mode", f"allowed: {', '.join(MODES)}")
        for name in ("crop", "stride"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise bad(name, "expected a positive int (or None)")
        if self.crop is not None and self.stride is not None and self.stride > self.crop:
            raise bad("stride", f"must not exceed crop={self.crop} (windows would leave gaps)")
        if not self.scales or any(isinstance(s, bool) or not isinstance(s, (int, float))
                                  or not s > 0 or not math.isfinite(s) for s in self.scales):
            raise bad("scales", "expected one or more positive numbers")
        if not isinstance(self.flip, bool):
            raise bad("flip", "expected true or false")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "InferenceConfig":
        return cls(**typed_values(values, field_types(cls), "inference"))


def _pad_to(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad (B, C, H, W) right and bottom to multiples of ``multiple``."""
    h, w = images.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return F.pad(images, (0, pw, 0, ph)) if ph or pw else images


def _whole(model: nn.Module, images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, K, H, W): padded to the patch, logits cropped back."""
    h, w = images.shape[-2:]
    return model(_pad_to(images, patch_size))[..., :h, :w]


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window starts along one side: every ``stride`` px, the last window ending at the border
    (one window at 0 when the side is not longer than the crop)."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(n)})


def _slide(model: nn.Module, images: Tensor, num_classes: int, crop: int, stride: int,
           patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, K, H, W), the mean of the overlapping windows' logits."""
    b, _, h, w = images.shape
    out = images.new_zeros(b, num_classes, h, w, dtype=torch.float32)
    count = images.new_zeros(1, 1, h, w, dtype=torch.float32)
    for y in window_starts(h, crop, stride):
        for x in window_starts(w, crop, stride):
            y2, x2 = min(y + crop, h), min(x + crop, w)
            out[..., y:y2, x:x2] += _whole(model, images[..., y:y2, x:x2], patch_size).float()
            count[..., y:y2, x:x2] += 1
    return out / count


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, num_classes: int, cfg: InferenceConfig,
            patch_size: int, align_corners: bool = False) -> Tensor:
    """Logits (B, K, H, W) for images (B, C, H, W) of any size.

    ``model(x)`` must map (B, C, h, w) with h, w multiples of ``patch_size`` to (B, K, h, w)
    logits (``StarSegmenter.forward``). See :class:`InferenceConfig` for the modes, and for what
    is returned with several views.
    """
    h, w = images.shape[-2:]
    crop = cfg.crop
    if cfg.mode == "slide" and crop is None:
        crop = getattr(getattr(model, "cfg", None), "img_size", None)
        if crop is None:
            raise ConfigError("invalid config: inference.crop=None; this model has no "
                              "cfg.img_size to take the window from: give the crop")
    stride = cfg.stride
    if cfg.mode == "slide" and stride is None:
        stride = max(int(crop * SLIDE_STRIDE), 1)

    def one_view(x: Tensor) -> Tensor:
        if cfg.mode == "slide":
            return _slide(model, x, num_classes, crop, stride, patch_size)
        return _whole(model, x, patch_size).float()

    views = []
    for scale in cfg.scales:
        x = images if scale == 1 else F.interpolate(
            images, size=(max(round(h * scale), 1), max(round(w * scale), 1)), mode="bilinear",
            align_corners=align_corners)
        for flip in (False, True) if cfg.flip else (False,):
            logits = one_view(x.flip(-1)).flip(-1) if flip else one_view(x)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear",
                                       align_corners=align_corners)
            views.append(logits)
    if len(views) == 1:
        return views[0]
    probs = torch.stack([v.softmax(dim=1) for v in views]).mean(0)
    return probs.clamp(min=torch.finfo(probs.dtype).tiny).log()


# ------------------------------------------------------------------------------ evaluation

def _sum_over_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: Iterable, device: torch.device,
                          amp_dtype: Optional[torch.dtype], num_classes: int, ignore_index: int,
                          infer: InferenceConfig, patch_size: int,
                          classes: Optional[Sequence[str]] = None, loss: bool = True,
                          align_corners: bool = False, progress: bool = False) -> dict[str, Any]:
    """mIoU, mAcc, aAcc, per-class IoU / Acc (see :func:`segmentation_metrics`) and, with
    ``loss``, the mean cross-entropy over valid pixels, of ``model`` over ``loader``.

    The loader yields ``(images (B, C, H', W'), masks (B, H, W))``: the images may be resized
    for testing, the masks at their original size; logits are resized bilinear to the mask's
    size before the argmax and the loss. Under a process group each rank reads its own share;
    the confusion matrix (int64) and the loss sums (float64) are summed over ranks, so the
    numbers are exact counts whatever the number of processes. ``progress``: a progress bar.
    """
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    valid = torch.zeros((), dtype=torch.int64, device=device)
    for images, masks in tqdm(loader, desc="eval", leave=False, disable=not progress,
                              dynamic_ncols=True, file=sys.stdout):
        images, masks = images.to(device), masks.to(device).long()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = predict(model, images, num_classes, infer, patch_size, align_corners)
        logits = logits.float()
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear",
                                   align_corners=align_corners)
        conf += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index)
        if loss:
            loss_sum += F.cross_entropy(logits, masks, ignore_index=ignore_index,
                                        reduction="sum").double()
            valid += (masks != ignore_index).sum()
    conf = _sum_over_ranks(conf)
    out = segmentation_metrics(conf, classes)
    if loss:
        loss_sum, valid = _sum_over_ranks(loss_sum), _sum_over_ranks(valid)
        out["loss"] = loss_sum.item() / valid.item() if valid.item() else math.nan
    return out
