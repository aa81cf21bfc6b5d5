"""Object detection / instance segmentation datasets and joint transforms, in torchvision's
detection format.

An item is ``(image, target)``: image (C, H, W) float32 in [0, 1], **not normalised** (the
detector's transform normalises, ``models.detection``); target ``{"boxes": (N, 4) float32
x0, y0, x1, y1 in pixels (x1, y1 exclusive edges), "labels": (N,) int64 in 1..K (0 is
torchvision's background), "masks": (N, H, W) uint8, "image_id": int, "area": (N,) float32,
"iscrowd": (N,) int64, "orig_size": (H0, W0) the size before any transform}``.

    SceneDetection(scenes, transform)         the built-in scenes: 1 channel, labels = class + 1
    CocoDetection(root, split, ...)           COCO 2017: train2017/, val2017/, annotations/
    DetectionTransform(opts, train)           resize / LSJ + flip (train), resize (eval)
    collate_detection(items)                  -> (list of images, list of targets)

COCO: category ids are mapped to contiguous labels 1..K in id order (``label_to_category``
maps back for evaluation); crowd annotations are left out of the targets (COCOeval reads them
from the annotation file); boxes are clipped to the image and those with no area left are
dropped (counted once, in one log line, when the file is read); with ``drop_empty`` images
without a usable annotation are left out (training; evaluation keeps every image). An
unreadable image is skipped like an ImageFolder image (:class:`~.folder.FallbackReads`:
replaced by the next readable item, named, counted against ``max_bad_fraction``, reported
through :func:`~.folder.collect_unreadable` in training). A missing or malformed annotation
file is one :class:`MissingFileError` / :class:`DataError` naming it.

Transforms draw from numpy's global generator (``np.random``), which the training sampler
reseeds per item, so a sample's augmentation is replayed exactly.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, MissingFileError
from .folder import FallbackReads, load_rgb, printable
from .scenes import SceneDataset

log = logging.getLogger("star_mamba")

COCO_SPLITS = ("train", "val")
COCO_LAYOUT = "root/{train,val}2017/*.jpg and root/annotations/instances_{train,val}2017.json"
LSJ_RANGE = (0.1, 2.0)  # ViTDet's large-scale jitter: random resize of the target size


@dataclass
class DetectionDataOptions:
    """How detection images are sized and augmented.

    Without ``lsj``: the image is resized so its shorter side is ``min_size`` and its longer at
    most ``max_size`` (both None: kept as is), then flipped with ``flip_prob`` (training).
    With ``lsj`` (ViTDet's large-scale jitter, training): resized by a random factor in
    ``lsj_range`` of the ``lsj_size`` square (keeping its aspect), randomly cropped or padded
    (bottom / right, zeros) to ``lsj_size`` x ``lsj_size``, flipped; evaluation then resizes
    the image to fit ``lsj_size`` (no crop). ``drop_empty``: training leaves out images with no
    object (COCO). ``max_bad_fraction``: the share of unreadable images tolerated.
    """

    min_size: Optional[int] = None
    max_size: Optional[int] = None
    flip_prob: float = 0.5
    lsj: bool = False
    lsj_size: int = 1024
    lsj_range: tuple[float, float] = LSJ_RANGE
    drop_empty: bool = True
    max_bad_fraction: float = 0.01

    def __post_init__(self) -> None:
        if (self.min_size is None) != (self.max_size is None):
            raise ConfigError("invalid detection data options: min_size / max_size: give both or "
                              "neither (neither: keep the image size)")
        if self.min_size is not None and not 0 < self.min_size <= self.max_size:
            raise ConfigError(f"invalid detection data options: min_size={self.min_size}, "
                              f"max_size={self.max_size}; expected 0 < min <= max")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"invalid detection data options: flip_prob={self.flip_prob}; expected [0, 1]")
        lo, hi = self.lsj_range
        if not 0 < lo <= hi:
            raise ConfigError(f"invalid detection data options: lsj_range={tuple(self.lsj_range)}; "
                              "expected 0 < min <= max")
        if self.lsj_size < 1:
            raise ConfigError(f"invalid detection data options: lsj_size={self.lsj_size}; expected >= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"invalid detection data options: max_bad_fraction={self.max_bad_fraction}; "
                              "expected [0, 1]")


# ------------------------------------------------------------------------------ targets

def make_target(boxes: Any, labels: Any, masks: Optional[Any], image_id: int,
                size: tuple[int, int], area: Optional[Any] = None,
                iscrowd: Optional[Any] = None) -> dict[str, Any]:
    """A torchvision target; ``masks`` None = no masks key (Faster R-CNN). ``area`` defaults to
    the masks' pixel counts (or the boxes' areas without masks)."""
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
    target: dict[str, Any] = dict(boxes=boxes, labels=labels, image_id=int(image_id))
    if masks is not None:
        masks = torch.as_tensor(np.asarray(masks, dtype=np.uint8).reshape(-1, *size))
        target["masks"] = masks
    if area is None:
        area = masks.flatten(1).sum(1).float() if masks is not None else box_area(boxes)
    target["area"] = torch.as_tensor(np.asarray(area, dtype=np.float32).reshape(-1))
    target["iscrowd"] = (torch.zeros(len(labels), dtype=torch.int64) if iscrowd is None
                         else torch.as_tensor(np.asarray(iscrowd, dtype=np.int64).reshape(-1)))
    target["orig_size"] = tuple(int(s) for s in size)
    return target


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _keep(target: dict[str, Any], keep: Tensor) -> dict[str, Any]:
    """The target's instances where ``keep`` (N,) bool."""
    out = dict(target)
    for key in ("boxes", "labels", "masks", "area", "iscrowd"):
        if key in out:
            out[key] = out[key][keep]
    return out


# ------------------------------------------------------------------------------ transforms

def resize(image: Tensor, target: dict[str, Any], size: tuple[int, int]) -> tuple[Tensor, dict]:
    """Image bilinear, masks nearest, boxes scaled to ``size`` (h, w); area rescaled."""
    h, w = image.shape[-2:]
    if (h, w) == tuple(size):
        return image, target
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    target = dict(target)
    sy, sx = size[0] / h, size[1] / w
    target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy])
    if "masks" in target:
        masks = target["masks"]
        target["masks"] = (F.interpolate(masks[None].float(), size=size, mode="nearest")[0]
                           .to(torch.uint8) if len(masks) else masks.new_zeros((0, *size)))
        target["area"] = target["masks"].flatten(1).sum(1).float()
    else:
        target["area"] = target["area"] * (sx * sy)
    return image, target


def fit_size(h: int, w: int, short: float, long: float) -> tuple[int, int]:
    """(h, w) scaled by one factor so the shorter side is ``short`` and the longer at most
    ``long`` (torchvision's rule), rounded."""
    scale = min(short / min(h, w), long / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def hflip(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict]:
    """Mirror left-right: x0' = W - x1, x1' = W - x0 (pixel-edge boxes), masks mirrored."""
    w = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def crop_pad(image: Tensor, target: dict[str, Any], top: int, left: int,
             size: tuple[int, int]) -> tuple[Tensor, dict]:
    """The ``size`` window at (top, left) of the image, zero-padded bottom / right where the
    image is smaller; boxes shifted and clipped, those with no area left dropped."""
    c, h, w = image.shape
    out = image.new_zeros((c, *size))
    ch, cw = min(size[0], h - top), min(size[1], w - left)
    out[:, :ch, :cw] = image[:, top:top + ch, left:left + cw]
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
    target["boxes"] = boxes
    if "masks" in target:
        masks = target["masks"]
        new = masks.new_zeros((len(masks), *size))
        new[:, :ch, :cw] = masks[:, top:top + ch, left:left + cw]
        target["masks"] = new
        target["area"] = new.flatten(1).sum(1).float()
    else:
        target["area"] = box_area(boxes)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return out, _keep(target, keep)


class DetectionTransform:
    """The joint (image, target) transform of :class:`DetectionDataOptions` for training
    (``train``: resize or LSJ, then flip) or evaluation (resize only; ``orig_size`` kept so
    predictions can be scaled back)."""

    def __init__(self, opts: DetectionDataOptions = DetectionDataOptions(), train: bool = True):
        self.opts, self.train = opts, train

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict]:
        o = self.opts
        h, w = image.shape[-2:]
        if o.lsj:
            scale = float(np.random.uniform(*o.lsj_range)) if self.train else 1.0
            factor = o.lsj_size * scale / max(h, w)
            image, target = resize(image, target, (max(1, round(h * factor)), max(1, round(w * factor))))
            if self.train:
                nh, nw = image.shape[-2:]
                top = int(np.random.randint(0, max(nh - o.lsj_size, 0) + 1))
                left = int(np.random.randint(0, max(nw - o.lsj_size, 0) + 1))
                image, target = crop_pad(image, target, top, left, (o.lsj_size, o.lsj_size))
        elif o.min_size is not None:
            image, target = resize(image, target, fit_size(h, w, o.min_size, o.max_size))
        if self.train and o.flip_prob > 0 and np.random.random() < o.flip_prob:
            image, target = hflip(image, target)
        return image, target


def collate_detection(items: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """A batch as torchvision's detectors take it: images of any sizes, one target each."""
    return [image for image, _ in items], [target for _, target in items]


# ------------------------------------------------------------------------------ scenes

class SceneDetection(Dataset):
    """The built-in scenes (:class:`~.scenes.SceneDataset`) as detection items: image
    (1, H, W) float in [0, 1] (grey; a model with ``in_chans=1``), one instance per visible
    item, label = class + 1 (1..10), its tight box and visible mask; ``image_id`` = the index.
    ``classes`` = ("background", 10 item classes); ``num_classes`` = 10 object classes."""

    def __init__(self, scenes: SceneDataset, transform: Optional[Callable] = None,
                 with_masks: bool = True):
        self.scenes, self.transform, self.with_masks = scenes, transform, with_masks
        self.classes = scenes.classes
        self.num_classes = len(scenes.classes) - 1
        self.label_to_category = {k: k for k in range(1, self.num_classes + 1)}

    def __len__(self) -> int:
        return len(self.scenes)

    def raw(self, index: int) -> tuple[Tensor, dict]:
        """The item before the transform (what the ground truth for COCOeval is built from)."""
        scene = self.scenes[index]
        size = scene.image.shape
        image = torch.from_numpy(scene.image).float().div_(255.0)[None]  # (1, H, W)
        inst = scene.instances
        masks = np.stack([i.mask for i in inst]) if inst else np.zeros((0, *size), bool)
        target = make_target([i.box for i in inst], [i.label + 1 for i in inst],
                             masks if self.with_masks else None, index, size,
                             area=masks.reshape(len(inst), -1).sum(1))
        return image, target

    def __getitem__(self, index: int):
        image, target = self.raw(index)
        return self.transform(image, target) if self.transform is not None else (image, target)


# ------------------------------------------------------------------------------ COCO

def read_coco_json(path: Path) -> dict:
    """The annotation file's content, checked for the keys used here; one clear error naming
    the file when it is missing, not JSON or not COCO's layout."""
    if not path.is_file():
        raise MissingFileError(f"COCO annotation file {printable(str(path))} does not exist "
                               f"(expected {COCO_LAYOUT})")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"COCO annotation file {printable(str(path))} is not valid JSON ({e})") from None
    except OSError as e:
        raise DataError(f"cannot read COCO annotation file {printable(str(path))} ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"COCO annotation file {printable(str(path))} holds no JSON object")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"COCO annotation file {printable(str(path))} lacks the list(s) "
                        f"{', '.join(missing)}")
    try:
        for image in data["images"]:
            int(image["id"]), str(image["file_name"]), int(image["height"]), int(image["width"])
        for ann in data["annotations"]:
            int(ann["id"]), int(ann["image_id"]), int(ann["category_id"])
            if len(ann["bbox"]) != 4:
                raise ValueError(f"annotation {ann['id']}: bbox {ann['bbox']!r} is not 4 numbers")
            [float(v) for v in ann["bbox"]]
        for cat in data["categories"]:
            int(cat["id"]), str(cat["name"])
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise DataError(f"COCO annotation file {printable(str(path))} is malformed ({what})") from None
    categories = {c["id"] for c in data["categories"]}
    if unknown := sorted({a["category_id"] for a in data["annotations"]} - categories):
        raise DataError(f"COCO annotation file {printable(str(path))}: annotations of category "
                        f"ids {unknown[:5]} not in its categories")
    return data


def coco_from_dict(data: dict):
    """A ``pycocotools.coco.COCO`` over in-memory annotations (its index messages silenced)."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def segmentation_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an (h, w) uint8 mask."""
    from pycocotools import mask as mask_utils
    if isinstance(segm, list):  # polygons
        polygons = [p for p in segm if len(p) >= 6]
        if not polygons:
            return np.zeros((h, w), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(np.uint8)


class CocoDetection(FallbackReads, Dataset):
    """COCO 2017 instances (``root/{split}2017/``, ``root/annotations/instances_{split}2017.json``)
    as detection items: image (3, H, W) float in [0, 1] (grey / RGBA / palette read as RGB),
    targets with contiguous labels 1..K and, with ``with_masks``, masks from the polygons or
    RLE. ``coco`` is the ground truth (pycocotools ``COCO``) for evaluation;
    ``label_to_category`` / ``category_to_label`` map labels to COCO category ids and back."""

    def __init__(self, root: str | Path, split: str = "train", transform: Optional[Callable] = None,
                 drop_empty: bool = True, with_masks: bool = True, max_bad_fraction: float = 0.01):
        if split not in COCO_SPLITS:
            raise ConfigError(f"invalid COCO split {split!r}; allowed: {', '.join(COCO_SPLITS)}")
        root = Path(root)
        self.ann_file = root / "annotations" / f"instances_{split}2017.json"
        self.image_dir = root / f"{split}2017"
        data = read_coco_json(self.ann_file)
        if not self.image_dir.is_dir():
            raise MissingFileError(f"COCO image folder {printable(str(self.image_dir))} does not "
                                   f"exist (expected {COCO_LAYOUT})")
        self.coco = coco_from_dict(data)
        cats = sorted(c["id"] for c in data["categories"])
        self.category_to_label = {c: i + 1 for i, c in enumerate(cats)}
        self.label_to_category = {i + 1: c for i, c in enumerate(cats)}
        names = {c["id"]: c["name"] for c in data["categories"]}
        self.classes = ("background", *(names[c] for c in cats))
        self.num_classes = len(cats)
        self.joint_transform, self.with_masks = transform, with_masks
        self.transform = None  # FallbackReads' image-only transform: the joint one runs after
        self.max_bad_fraction, self.where = max_bad_fraction, str(self.image_dir)
        self.bad: dict[str, str] = {}
        self.images = {int(i["id"]): i for i in data["images"]}
        per_image: dict[int, list] = {i: [] for i in self.images}
        self.degenerate = 0
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0) or int(ann["image_id"]) not in per_image:
                continue
            info = self.images[int(ann["image_id"])]
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x0, x1 = min(max(x, 0.0), info["width"]), min(max(x + bw, 0.0), info["width"])
            y0, y1 = min(max(y, 0.0), info["height"]), min(max(y + bh, 0.0), info["height"])
            if not (x1 > x0 and y1 > y0):
                self.degenerate += 1
                continue
            per_image[int(ann["image_id"])].append(
                (self.category_to_label[int(ann["category_id"])], (x0, y0, x1, y1),
                 ann.get("segmentation"), float(ann.get("area", (x1 - x0) * (y1 - y0)))))
        if self.degenerate:
            log.warning(f"{self.degenerate} COCO box(es) with no area inside their image dropped "
                        f"from the targets ({printable(str(self.ann_file))})")
        self.annotations = per_image
        self.ids = sorted(i for i in self.images if per_image[i] or not drop_empty)
        if not self.ids:
            raise DataError(f"no usable image in {printable(str(self.ann_file))}"
                            + (" (every image without objects: drop_empty)" if drop_empty else ""))

    def __len__(self) -> int:
        return len(self.ids)

    def _name(self, index: int) -> str:
        return str(self.image_dir / self.images[self.ids[index]]["file_name"])

    def _read(self, index: int):
        image_id = self.ids[index]
        info = self.images[image_id]
        img = load_rgb(self._name(index))
        h, w = int(info["height"]), int(info["width"])
        if img.size != (w, h):
            raise DataError(f"COCO image {printable(self._name(index))} is {img.size[0]} x "
                            f"{img.size[1]}, its annotations say {w} x {h}")
        anns = self.annotations[image_id]
        masks = None
        if self.with_masks:
            masks = (np.stack([segmentation_mask(s, h, w) if s else np.zeros((h, w), np.uint8)
                               for _, _, s, _ in anns]) if anns else np.zeros((0, h, w), np.uint8))
        target = make_target([a[1] for a in anns], [a[0] for a in anns], masks, image_id, (h, w),
                             area=[a[3] for a in anns])
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return image.contiguous(), target

    def __getitem__(self, index: int):
        image, target = FallbackReads.__getitem__(self, index)
        if self.joint_transform is not None:
            image, target = self.joint_transform(image, target)
        return image, target


def build_coco_detection(root: str | Path, split: str, opts: DetectionDataOptions = DetectionDataOptions(),
                         train: Optional[bool] = None, with_masks: bool = True) -> CocoDetection:
    """COCO ``split`` with :class:`DetectionTransform` (``train`` default: split == train);
    ``drop_empty`` only applies to training, evaluation keeps every image."""
    train = split == "train" if train is None else train
    return CocoDetection(root, split, DetectionTransform(opts, train), drop_empty=opts.drop_empty and train,
                         with_masks=with_masks, max_bad_fraction=opts.max_bad_fraction)


__all__ = ["CocoDetection", "DetectionDataOptions", "DetectionTransform", "SceneDetection",
           "build_coco_detection", "coco_from_dict", "collate_detection", "crop_pad", "fit_size",
           "hflip", "make_target", "read_coco_json", "resize", "segmentation_mask"]
