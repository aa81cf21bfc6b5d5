"""What each ``data.name`` is, in one place: every task, tool and check reads it from here.

A :class:`DatasetSpec` says whether the images are RGB files, the statistics the inputs are
normalised with (and so how to show them again), the split kept for evaluation, whether items
can be read by index or only as a stream, which ``data.sequence`` kinds can draw from it, what
``data.root`` must point at, whether it has classes (fine-tuning, probing) and which kind of
task reads it (classification or segmentation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import fashion_mnist as fm
from .sequences import SEQUENCE_KINDS


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    rgb: bool  # RGB files (model.in_chans must be 3)
    mean: Optional[tuple[float, ...]]  # input normalisation; None: not normalised (synthetic)
    std: Optional[tuple[float, ...]]
    eval_split: Optional[str]  # the split evaluation reads when data.eval_split is unset
    random_access: bool  # items by index (False: a stream, read in index order)
    sequences: tuple[str, ...]  # the data.sequence kinds it serves
    root: Optional[str]  # what data.root points at, when it is required
    classes: bool = True  # labels with a meaning (fine-tuning, linear probes)
    # what its labels are for: classification (fine-tuning, probes, pretraining on the images)
    # or segmentation (per-pixel masks, `star-mamba segment` only)
    task_kind: str = "classification"

    def display(self, x):
        """Undo the input normalisation: (..., C, H, W) -> display values in [0, 1]."""
        import torch
        if self.mean is None:  # synthetic images are not normalised: a fixed range
            return ((x + 2.5) / 5.0).clamp(0, 1)
        channels = x.shape[-3]
        mean = torch.tensor(self.mean * (channels // len(self.mean)), dtype=x.dtype)
        std = torch.tensor(self.std * (channels // len(self.std)), dtype=x.dtype)
        return (x * std[:, None, None] + mean[:, None, None]).clamp(0, 1)


_IMAGENET = dict(mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD))
_INDEXED = tuple(k for k in SEQUENCE_KINDS if k != "clip")  # clip moves Fashion-MNIST items

SPECS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("fashion_mnist", rgb=False, mean=(fm.MEAN,), std=(fm.STD,), eval_split="test",
                random_access=True, sequences=SEQUENCE_KINDS, root=None),
    DatasetSpec("imagefolder", rgb=True, **_IMAGENET, eval_split="val", random_access=True,
                sequences=_INDEXED, root="a directory holding train/ and val/ class folders"),
    DatasetSpec("shards", rgb=True, **_IMAGENET, eval_split="val", random_access=False,
                sequences=("random",),
                root="the OUT directory (or URL) of `star-mamba prepare-data SRC OUT`"),
    DatasetSpec("hf", rgb=True, **_IMAGENET, eval_split="test", random_access=True,
                sequences=_INDEXED, root="a directory written by datasets' save_to_disk"),
    # no files and no split: held-out images are the generator's next ones
    DatasetSpec("synthetic", rgb=False, mean=None, std=None, eval_split=None, random_access=True,
                sequences=SEQUENCE_KINDS, root=None, classes=False),
    # segmentation: (image, mask) pairs, never read as STAR sequences ("random" keeps
    # data.sequence's default valid; the segmentation task ignores it)
    DatasetSpec("scenes", rgb=False, mean=(fm.MEAN,), std=(fm.STD,), eval_split="test",
                random_access=True, sequences=("random",), root=None,
                task_kind="segmentation"),
    DatasetSpec("ade20k", rgb=True, **_IMAGENET, eval_split="validation", random_access=True,
                sequences=("random",),
                root="the ADEChallengeData2016 directory (images/, annotations/)",
                task_kind="segmentation"),
    DatasetSpec("seg_folder", rgb=True, **_IMAGENET, eval_split="val", random_access=True,
                sequences=("random",),
                root="a directory holding images/<split>/, masks/<split>/ and classes.txt",
                task_kind="segmentation"),
    # detection: images with boxes and instance masks (the scenes serve detection too)
    DatasetSpec("coco", rgb=True, **_IMAGENET, eval_split="val", random_access=True,
                sequences=("random",),
                root="the COCO 2017 directory (train2017/, val2017/, annotations/)",
                task_kind="detection"),
)}
DATASET_NAMES = tuple(SPECS)
TASK_KINDS = ("classification", "segmentation", "detection")


def spec(name: str) -> DatasetSpec:
    return SPECS[name]


__all__ = ["DATASET_NAMES", "DatasetSpec", "SPECS", "TASK_KINDS", "spec"]
