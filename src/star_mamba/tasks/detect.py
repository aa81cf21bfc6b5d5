"""Object detection and instance segmentation on a STAR backbone (``star-mamba detect``).

``detect``: torchvision's Mask R-CNN (or Faster R-CNN, ``detect.kind``) on the STAR backbone
through ViTDet's simple feature pyramid (``models/detection.py``), the backbone initialised from
a STAR pretraining checkpoint or a fine-tuned classifier (``run.pretrained``, the one checkpoint
loader), trained by the :class:`~star_mamba.engine.trainer.Trainer` on the sum of torchvision's
losses with layer-wise lr decay and drop path on the backbone, and scored after each evaluation
epoch by the official COCO evaluation (pycocotools' COCOeval: box AP, mask AP), predictions
gathered over ranks. Each evaluation writes ``eval.json`` and ``predictions.png``; the best
checkpoint is kept by box AP. ``evaluate_detection_checkpoint``: the same for a saved detector.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..checkpoint import load_checkpoint, write_json
from ..config import StarConfig
from ..data.build import detection_sets
from ..data.detection import collate_detection
from ..engine.config import RunConfig, load_config
from ..engine.run import start_run
from ..engine.trainer import Trainer, TrainTask
from ..errors import CheckpointError, ConfigError
from ..evaluation.detection import evaluate_detection, scenes_to_coco
from ..models.detection import build_detector
from ..seeding import seed_everything
from .dense import load_backbone, saved_task

log = logging.getLogger("star_mamba")

EVAL_RESULT = "eval.json"
PREDICTIONS = "predictions.png"
SCORES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP")  # logged each evaluation


def detector_config(cfg: RunConfig):
    """``detect``'s DetectorConfig; the input normalisation, when unset, is the dataset's
    (``data/specs.py``: Fashion-MNIST's for the grey scenes, ImageNet's for COCO)."""
    det_cfg = cfg.detect.detector_config()
    spec = cfg.data.spec
    if det_cfg.image_mean is None and spec.mean is not None:
        det_cfg = dataclasses.replace(det_cfg, image_mean=tuple(spec.mean),
                                      image_std=tuple(spec.std))
    return det_cfg


def detector_for(cfg: RunConfig, num_classes: int):
    """The run's detector (``num_classes`` object classes), the backbone loaded from
    ``run.pretrained`` (the default checkpoint missing: a warning and random weights)."""
    model_cfg = cfg.model.star_config()
    model = build_detector(model_cfg, num_classes, detector_config(cfg))
    load_backbone(model.backbone.body, cfg.run.pretrained, "detects")
    return model, model_cfg


def ground_truth(cfg: RunConfig, eval_set):
    """The pycocotools ``COCO`` the evaluation split is scored against."""
    base = getattr(eval_set, "dataset", eval_set)
    return base.coco if cfg.data.name == "coco" else scenes_to_coco(eval_set)


def eval_loader(eval_set, cfg: RunConfig, info) -> DataLoader:
    """Each rank reads every world_size-th image; batches are lists (images of any size)."""
    indices = list(range(info.rank, len(eval_set), info.world_size))
    return DataLoader(eval_set, batch_size=cfg.detect.eval_batch_size, sampler=indices,
                      num_workers=cfg.data.num_workers, collate_fn=collate_detection)


def detect(cfg: RunConfig) -> dict[str, Any]:
    """Train a detector; returns the Trainer's summary with the last evaluation's scores."""
    if cfg.task != "detect":
        raise ConfigError(f"detect() needs a detection config, got task {cfg.task!r}")
    d = cfg.detect
    masks = d.kind == "mask_rcnn"
    base = cfg.model.star_config()
    with start_run(cfg, trains=True) as ctx:  # the reader's counts (dropped boxes) reach log.txt
        train_set, eval_set, classes, label_to_category = detection_sets(
            cfg.data, d.data_options(max_bad_fraction=cfg.data.max_bad_fraction), base.in_chans, cfg.run.seed,
            masks)
        coco_gt = ground_truth(cfg, eval_set)
        seed_everything(cfg.run.seed)
        model, model_cfg = detector_for(cfg, len(classes) - 1)
        model.to(ctx.device)

        def loss_fn(m, images, targets):
            losses = m(list(images), list(targets))  # torchvision: a dict of losses in training
            return sum(losses.values())

        loader = eval_loader(eval_set, cfg, ctx.info)
        last: dict[str, Any] = {}

        def run_eval(epoch: int) -> dict[str, float]:
            result = evaluate_detection(model, loader, ctx.device, ctx.amp_dtype, coco_gt,
                                        label_to_category, masks)
            if ctx.info.is_main:
                write_json(ctx.output_dir / EVAL_RESULT, dict(epoch=epoch, **result))
                if d.viz_images:
                    draw_detections(model, eval_set, classes, ctx.output_dir / PREDICTIONS,
                                    d.viz_images)
            last.update(result)
            return {**{k: result[k] for k in SCORES if k in result},
                    "score": result["bbox_mAP"]}

        what = "Mask R-CNN" if masks else "Faster R-CNN"
        task = TrainTask(f"STAR detection ({what})", model, model_cfg.replace(
            num_classes=len(classes) - 1), train_set, loss_fn,
            describe=f", {model_cfg.directions} directions, simple feature pyramid "
                     f"({d.fpn_channels} channels), {len(classes) - 1} classes",
            evaluate=run_eval, collate=collate_detection, shardable=False,
            compile_auto=False,
            loss_name="sum of the R-CNN losses (RPN, box" + (", mask)" if masks else ")"))
        summary = Trainer(cfg, ctx, task).train()
    return {**summary, **{k: last[k] for k in SCORES if k in last}}


@torch.no_grad()
def draw_detections(model, dataset, classes: Sequence[str], out: Path, n: int,
                    score_threshold: float = 0.5) -> Path:
    """``out``: the first ``n`` evaluation images with the predicted boxes (and masks) above
    ``score_threshold`` beside the true ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = min(n, len(dataset))
    fig, axes = plt.subplots(n, 2, figsize=(5, 2.5 * n), squeeze=False)
    for row in range(n):
        image, target = dataset[row]
        pred = model([image.to(device)])[0]
        keep = pred["scores"] >= score_threshold
        shown = image.permute(1, 2, 0).cpu().numpy()
        for col, (title, boxes, labels, masks) in enumerate((
                ("prediction", pred["boxes"][keep], pred["labels"][keep],
                 pred.get("masks", torch.zeros(0))[keep] if "masks" in pred else None),
                ("truth", target["boxes"], target["labels"], target.get("masks")))):
            ax = axes[row, col]
            ax.imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown, cmap="gray")
            if masks is not None and len(masks):
                overlay = (masks.float().reshape(len(masks), *image.shape[-2:]) > 0.5).any(0)
                ax.imshow(overlay.cpu().numpy(), alpha=0.3, cmap="autumn")
            for box, label in zip(boxes.tolist(), labels.tolist()):
                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", lw=1))
                ax.text(x0, y0, str(classes[label])[:10], color="lime", fontsize=6)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    model.train(was_training)
    return out


def evaluate_detection_checkpoint(checkpoint: str | Path, cfg: Optional[RunConfig] = None,
                                  overrides: Sequence[str] = ()) -> dict[str, Any]:
    """COCO box (and mask) AP of a ``detect`` checkpoint on its run's evaluation split."""
    saved = load_checkpoint(Path(checkpoint))
    if saved_task(saved) != "detect":
        raise CheckpointError(f"{checkpoint} is not a detection checkpoint")
    if cfg is None:
        cfg = load_config(None, overrides, task="detect", base=saved["run_config"])
    model_cfg = StarConfig.from_dict(saved["model_config"])
    masks = cfg.detect.kind == "mask_rcnn"
    _, eval_set, classes, label_to_category = detection_sets(
        cfg.data, cfg.detect.data_options(max_bad_fraction=cfg.data.max_bad_fraction), model_cfg.in_chans,
        cfg.run.seed, masks, train=False)
    if len(classes) - 1 != model_cfg.num_classes:
        raise ConfigError(f"{checkpoint} detects {model_cfg.num_classes} classes but the "
                          f"evaluation data (data.name={cfg.data.name}) has {len(classes) - 1}")
    model = build_detector(model_cfg, model_cfg.num_classes, detector_config(cfg))
    model.load_state_dict(saved["model"])
    ctx = start_run(cfg, record=False)
    result = evaluate_detection(model.to(ctx.device), eval_loader(eval_set, cfg, ctx.info),
                                ctx.device, ctx.amp_dtype, ground_truth(cfg, eval_set),
                                label_to_category, masks)
    log.info(f"{checkpoint}: box AP {result['bbox_mAP']:.2f}"
             + (f", mask AP {result['segm_mAP']:.2f}" if "segm_mAP" in result else "")
             + f" on {len(eval_set)} images")
    return result
