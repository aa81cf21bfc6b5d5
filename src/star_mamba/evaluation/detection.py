"""Detection and instance segmentation scores with the official COCO evaluation (pycocotools'
``COCOeval``): box and mask AP over IoU 0.5:0.95, AP50, AP75, AP small / medium / large, AR.

    to_coco_results(outputs, image_ids, label_to_category, with_masks)  -> COCO result dicts
    coco_evaluate(coco_gt, results, iou_types, image_ids)               -> metrics in percent
    scenes_to_coco(dataset)                                             -> COCO ground truth
    gather_results(per_image)                                           -> every rank's results
    evaluate_detection(model, loader, device, ...)                      -> metrics

Metrics are ``{iou_type}_mAP``, ``_mAP_50``, ``_mAP_75``, ``_mAP_s``, ``_mAP_m``, ``_mAP_l``,
``_AR_1``, ``_AR_10``, ``_AR_100``, ``_AR_s``, ``_AR_m``, ``_AR_l`` (``iou_type`` bbox or
segm): ``COCOeval.stats`` x 100, NaN where COCOeval has no value (-1: no ground truth in an
area range). No detection at all gives zeros, not an error.

Under ``torch.distributed`` every rank predicts its share of the loader; the per-image results
are gathered to every rank (a padded sampler's repeated images count once), rank 0 runs
COCOeval and broadcasts the metrics, so every rank returns the same dict.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
              "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l")  # COCOeval.stats, in order
MASK_THRESHOLD = 0.5


def metric_names(iou_types: Sequence[str] = IOU_TYPES) -> list[str]:
    return [f"{t}_{name}" for t in iou_types for name in STAT_NAMES]


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool / uint8 -> COCO compressed RLE with ``counts`` as str (JSON-safe)."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco_results(outputs: Sequence[Mapping[str, Tensor]], image_ids: Sequence[int],
                    label_to_category: Optional[Mapping[int, int]] = None,
                    with_masks: bool = True) -> list[dict]:
    """torchvision detector outputs (one per image, in that image's original coordinates) ->
    COCO result dicts ``{"image_id", "category_id", "bbox" [x, y, w, h], "score"(,
    "segmentation" RLE of the mask probabilities > 0.5)}``. ``label_to_category`` maps labels
    1..K to category ids (None: the same numbers)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if not len(boxes):
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        masks = None
        if with_masks:
            masks = out["masks"].detach().float().cpu()
            masks = (masks[:, 0] if masks.dim() == 4 else masks) > MASK_THRESHOLD  # (N, H, W)
            masks = masks.numpy()
        for k, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            category = label_to_category[label] if label_to_category is not None else label
            result = dict(image_id=int(image_id), category_id=int(category),
                          bbox=[float(v) for v in box], score=float(score))
            if masks is not None:
                result["segmentation"] = encode_mask(masks[k])
            results.append(result)
    return results


def coco_evaluate(coco_gt, results: Sequence[dict], iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Optional[Iterable[int]] = None) -> dict[str, float]:
    """COCOeval of ``results`` against ``coco_gt`` (a pycocotools ``COCO``) for each IoU type;
    ``image_ids`` restricts the evaluation to those images (None: every ground-truth image).
    A box evaluation reads the results' boxes, a mask evaluation their masks (the area of a
    detection, for the small / medium / large ranges, is then the mask's). Percent."""
    from pycocotools.cocoeval import COCOeval
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"invalid iou_type {iou_type!r}; allowed: {', '.join(IOU_TYPES)}")
        key = "bbox" if iou_type == "bbox" else "segmentation"
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        dets = [{k: v for k, v in r.items() if k != drop} for r in results if key in r]
        if not dets:
            metrics.update({f"{iou_type}_{n}": 0.0 for n in STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco_dt = coco_gt.loadRes([dict(d) for d in dets])  # loadRes writes into the dicts
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(STAT_NAMES, evaluator.stats):
            metrics[f"{iou_type}_{name}"] = float(value) * 100 if value >= 0 else math.nan
    return metrics


def scenes_to_coco(dataset):
    """An in-memory COCO ground truth of a ``data.detection.SceneDetection`` (or any dataset
    whose ``raw(i)`` / items give ``(image, target)`` with masks, before any transform): one
    image per index (id = ``target["image_id"]``), one annotation per instance with its box,
    mask (RLE) and mask area; categories 1..K named after ``dataset.classes[1:]``."""
    from ..data.detection import coco_from_dict
    images, annotations = [], []
    for index in range(len(dataset)):
        image, target = dataset.raw(index) if hasattr(dataset, "raw") else dataset[index]
        h, w = image.shape[-2:]
        image_id = int(target["image_id"])
        images.append(dict(id=image_id, height=int(h), width=int(w), file_name=f"{image_id}.png"))
        masks = target.get("masks")
        for k, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist())):
            x0, y0, x1, y1 = box
            ann = dict(id=len(annotations) + 1, image_id=image_id, category_id=int(label),
                       bbox=[x0, y0, x1 - x0, y1 - y0], iscrowd=0,
                       area=float(target["area"][k]) if "area" in target else (x1 - x0) * (y1 - y0))
            if masks is not None:
                ann["segmentation"] = encode_mask(masks[k].numpy())
            annotations.append(ann)
    names = getattr(dataset, "classes", None)
    count = len(names) - 1 if names else max((a["category_id"] for a in annotations), default=1)
    categories = [dict(id=k, name=str(names[k]) if names else str(k)) for k in range(1, count + 1)]
    return coco_from_dict(dict(images=images, annotations=annotations, categories=categories))


def gather_results(per_image: Mapping[int, list]) -> dict[int, list]:
    """``{image_id: [result dicts]}`` of every rank, on every rank (``all_gather_object``); an
    image predicted on several ranks (a padded distributed sampler) keeps the lowest rank's.
    Without a process group: the input as it is."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(per_image)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(per_image))
    merged: dict[int, list] = {}
    for part in gathered:
        for image_id, results in part.items():
            merged.setdefault(image_id, results)
    return merged


def _to_original_size(out: dict[str, Tensor], size: Sequence[int], orig: Sequence[int]) -> dict:
    """An output at the (transformed) input size scaled back to the original image size."""
    if tuple(size) == tuple(orig):
        return out
    sy, sx = orig[0] / size[0], orig[1] / size[1]
    out = dict(out)
    out["boxes"] = out["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=out["boxes"].dtype)
    if "masks" in out and len(out["masks"]):
        out["masks"] = F.interpolate(out["masks"].float(), size=tuple(orig), mode="bilinear",
                                     align_corners=False)
    return out


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: Iterable, device: torch.device | str,
                       amp_dtype: Optional[torch.dtype] = None, coco_gt=None,
                       label_to_category: Optional[Mapping[int, int]] = None,
                       with_masks: Optional[bool] = None,
                       iou_types: Optional[Sequence[str]] = None) -> dict[str, float]:
    """COCO metrics of a torchvision detector over ``loader`` (batches ``(images, targets)`` of
    :func:`~star_mamba.data.detection.collate_detection`; each target's ``image_id`` names its
    ground-truth image in ``coco_gt`` and ``orig_size`` the size predictions are scaled back
    to). ``with_masks`` None: masks if the model returns them; ``iou_types`` None: bbox (+ segm
    with masks). Only the images the loader gave are scored (over every rank). The model is
    left in the mode it was in."""
    if coco_gt is None:
        raise ValueError("evaluate_detection needs the ground truth coco_gt (a pycocotools COCO)")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    per_image: dict[int, list] = {}
    try:
        for images, targets in loader:
            images = [image.to(device, non_blocking=True) for image in images]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                outputs = model(images)
            for image, target, out in zip(images, targets, outputs):
                out = {k: v.float().cpu() for k, v in out.items()}
                out = _to_original_size(out, image.shape[-2:], target.get("orig_size", image.shape[-2:]))
                masks = with_masks if with_masks is not None else "masks" in out
                image_id = int(target["image_id"])
                per_image[image_id] = to_coco_results([out], [image_id], label_to_category, masks)
                if with_masks is None:
                    with_masks = masks
    finally:
        model.train(was_training)
    per_image = gather_results(per_image)
    types = tuple(iou_types) if iou_types is not None else (("bbox", "segm") if with_masks else ("bbox",))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    metrics = None
    if not distributed or dist.get_rank() == 0:
        results = [r for image_id in sorted(per_image) for r in per_image[image_id]]
        metrics = coco_evaluate(coco_gt, results, types, image_ids=per_image.keys())
    if distributed:
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


__all__ = ["IOU_TYPES", "STAT_NAMES", "coco_evaluate", "encode_mask", "evaluate_detection",
           "gather_results", "metric_names", "scenes_to_coco", "to_coco_results"]
