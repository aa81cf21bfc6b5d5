"""Semantic segmentation on a STAR backbone (``star-mamba segment``).

``segment``: a :class:`~star_mamba.models.segmentation.StarSegmenter` (the classifier's
multi-direction backbone with taps, a simple feature pyramid and a UPerNet head with an
auxiliary FCN head, or a per-patch linear head on the frozen backbone) initialised from a STAR
pretraining checkpoint or a fine-tuned classifier (``run.pretrained``, through the one
checkpoint loader), trained by the :class:`~star_mamba.engine.trainer.Trainer` with
cross-entropy (ignore index excluded) and scored after each evaluation epoch by mIoU from a
confusion matrix summed over ranks. Each evaluation writes ``eval.json`` (mIoU, mAcc, aAcc, the
per-class table) and ``predictions.png`` (image, prediction, truth); the best checkpoint is
kept by mIoU. ``evaluate_segmentation_checkpoint``: the same scores for a saved segmenter.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..checkpoint import load_checkpoint, write_json
from ..config import StarConfig
from ..data.build import segmentation_sets
from ..engine.config import RunConfig, load_config
from ..engine.loaders import eval_loader
from ..engine.run import maybe_compile, start_run
from ..engine.trainer import Trainer, TrainTask
from ..errors import CheckpointError, ConfigError
from ..evaluation.segmentation import evaluate_segmentation
from ..models.segmentation import StarSegmenter, segmentation_loss
from ..seeding import seed_everything
from .dense import load_backbone, saved_task

log = logging.getLogger("star_mamba")

EVAL_RESULT = "eval.json"
PREDICTIONS = "predictions.png"


def segmenter_config(cfg: RunConfig, num_classes: int) -> StarConfig:
    """The backbone's model config; its ``num_classes`` is the dataset's (the segmenter's
    classes), which a config that sets it must agree with."""
    model_cfg = cfg.model.star_config(num_classes=num_classes)
    if model_cfg.num_classes != num_classes:
        raise ConfigError(f"invalid config: model.num_classes={model_cfg.num_classes} but "
                          f"data.name={cfg.data.name} has {num_classes} classes; leave "
                          "model.num_classes unset to follow the dataset")
    if cfg.segment.head == "linear" and model_cfg.drop_path_rate:
        log.warning("segment.head=linear freezes the backbone: model.drop_path_rate="
                    f"{model_cfg.drop_path_rate} is set to 0 (a probe reads fixed features)")
        model_cfg = model_cfg.replace(drop_path_rate=0.0)
    return model_cfg


def build_segmenter(cfg: RunConfig, model_cfg: StarConfig) -> StarSegmenter:
    """The run's segmenter, its backbone loaded from ``run.pretrained`` (a missing default
    checkpoint is a warning and a random backbone; a missing named one is an error)."""
    model = StarSegmenter(model_cfg, model_cfg.num_classes, cfg.segment.segmenter_config())
    load_backbone(model.backbone, cfg.run.pretrained, "segments")
    if cfg.segment.head == "linear":
        for p in model.backbone.parameters():
            p.requires_grad = False
    return model




def segment(cfg: RunConfig) -> dict[str, Any]:
    """Train a segmenter; returns the Trainer's summary with the last evaluation's scores."""
    if cfg.task != "segment":
        raise ConfigError(f"segment() needs a segmentation config, got task {cfg.task!r}")
    r, s = cfg.run, cfg.segment
    base = cfg.model.star_config()
    train_set, eval_set, classes = segmentation_sets(cfg.data, base.img_size, base.in_chans,
                                                     r.seed)
    model_cfg = segmenter_config(cfg, len(classes))
    ignore = cfg.data.ignore_index
    with start_run(cfg, trains=True) as ctx:
        seed_everything(r.seed)
        model = build_segmenter(cfg, model_cfg).to(ctx.device)
        if s.norm == "bn" and ctx.info.enabled:  # batch statistics over every rank's images
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

        def loss_fn(m, images, masks):
            logits, aux = m(images, with_aux=True)
            return segmentation_loss(logits.float(), None if aux is None else aux.float(), masks,
                                     s.aux_weight, ignore)

        loader = eval_loader(eval_set, eval_batch_size(cfg), ctx.info, cfg.data.num_workers)
        eval_model = maybe_compile(model, r, ctx.device, auto=False)
        last: dict[str, Any] = {}

        def run_eval(epoch: int) -> dict[str, float]:
            result = score(eval_model, loader, cfg, ctx, classes)
            if ctx.info.is_main:
                write_json(ctx.output_dir / EVAL_RESULT, dict(epoch=epoch, **result))
                if s.viz_images:
                    draw_predictions(model, eval_set, cfg, ctx.output_dir / PREDICTIONS, classes)
            last.update(result)
            return dict(mIoU=result["mIoU"], mAcc=result["mAcc"], aAcc=result["aAcc"],
                        score=result["mIoU"])

        head = ("per-patch linear head on the frozen backbone" if s.head == "linear" else
                f"UPerNet head ({s.channels} channels) on a simple feature pyramid"
                + (f", auxiliary FCN head x {s.aux_weight:g}" if s.aux_weight else ""))
        task = TrainTask("STAR segmentation", model, model_cfg, train_set, loss_fn,
                         describe=f", {model_cfg.directions} directions, {head}, "
                                  f"{len(classes)} classes",
                         evaluate=run_eval, shardable=False, compile_auto=False,
                         loss_name="per-pixel cross-entropy" + (f" + {s.aux_weight:g} x auxiliary"
                                                                if s.aux_weight else ""))
        summary = Trainer(cfg, ctx, task).train()
    return {**summary, **{k: last[k] for k in ("mIoU", "mAcc", "aAcc") if k in last}}


def eval_batch_size(cfg: RunConfig) -> int:
    """``segment.eval_batch_size``, or the training batch where every evaluation image has one
    size (the built-in scenes), else 1 (files of many sizes, scored at their own)."""
    if cfg.segment.eval_batch_size is not None:
        return cfg.segment.eval_batch_size
    return cfg.optim.batch_size if cfg.data.name == "scenes" else 1


def score(model: torch.nn.Module, loader, cfg: RunConfig, ctx, classes: Sequence[str]) -> dict:
    """mIoU, mAcc, aAcc (percent) and the per-class table of ``model`` on ``loader``."""
    return evaluate_segmentation(model, loader, ctx.device, ctx.amp_dtype, len(classes),
                                 cfg.data.ignore_index, cfg.segment.inference_config(),
                                 cfg.model.star_config().patch_size, classes,
                                 align_corners=cfg.segment.align_corners,
                                 progress=cfg.run.progress and ctx.info.is_main)


@torch.no_grad()
def draw_predictions(model: StarSegmenter, dataset, cfg: RunConfig, out: Path,
                     classes: Sequence[str]) -> Path:
    """``out``: the first ``segment.viz_images`` evaluation images, each as image, prediction
    and truth side by side (one colour per class, ignored pixels black)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..evaluation.segmentation import predict

    n = min(cfg.segment.viz_images, len(dataset))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    palette = plt.get_cmap("tab20", max(len(classes), 2))
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    spec = cfg.data.spec
    for row in range(n):
        image, mask = dataset[row]
        logits = predict(model, image[None].to(device), len(classes),
                         cfg.segment.inference_config(), cfg.model.star_config().patch_size)
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = torch.nn.functional.interpolate(logits, size=mask.shape[-2:],
                                                     mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu().numpy()
        shown = spec.display(image).permute(1, 2, 0).numpy()
        for col, (title, picture) in enumerate((("image", shown), ("prediction", pred),
                                                ("truth", mask.numpy()))):
            ax = axes[row, col]
            if col == 0:
                ax.imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown,
                          cmap="gray", vmin=0, vmax=1)
            else:
                colours = palette(np.clip(picture, 0, len(classes) - 1) % palette.N)[..., :3]
                colours[picture == cfg.data.ignore_index] = 0
                ax.imshow(colours, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    model.train(was_training)
    return out


def load_segmenter(saved: dict, name: str, cfg: Optional[RunConfig] = None) -> StarSegmenter:
    """The segmenter a ``segment`` checkpoint holds, rebuilt from its model and run configs."""
    if saved_task(saved) != "segment":
        raise CheckpointError(f"{name} is not a segmentation checkpoint (its run's task is "
                              f"{saved_task(saved)!r})")
    run_config = saved["run_config"]
    cfg = cfg or load_config(None, task="segment", base=run_config)
    model_cfg = StarConfig.from_dict(saved["model_config"])
    model = StarSegmenter(model_cfg, model_cfg.num_classes, cfg.segment.segmenter_config())
    model.load_state_dict(saved["model"])
    return model


def evaluate_segmentation_checkpoint(checkpoint: str | Path, cfg: Optional[RunConfig] = None,
                                     overrides: Sequence[str] = ()) -> dict[str, Any]:
    """mIoU, mAcc, aAcc and the per-class table of a ``segment`` checkpoint, on the evaluation
    split of the run that made it (``cfg``: another config; ``overrides`` applied to the saved
    one)."""
    saved = load_checkpoint(Path(checkpoint))
    if saved_task(saved) != "segment":
        raise CheckpointError(f"{checkpoint} is not a segmentation checkpoint")
    if cfg is None:
        cfg = load_config(None, overrides, task="segment", base=saved["run_config"])
    model = load_segmenter(saved, str(checkpoint), cfg)
    _, eval_set, classes = segmentation_sets(cfg.data, model.cfg.img_size, model.cfg.in_chans,
                                             cfg.run.seed, train=False)
    if len(classes) != model.num_classes:
        raise ConfigError(f"{checkpoint} segments {model.num_classes} classes but the evaluation "
                          f"data (data.name={cfg.data.name}) has {len(classes)}")
    ctx = start_run(cfg, record=False)
    model = maybe_compile(model.to(ctx.device), cfg.run, ctx.device, auto=False)
    result = score(model, eval_loader(eval_set, eval_batch_size(cfg), ctx.info,
                                      cfg.data.num_workers), cfg, ctx, classes)
    log.info(f"{checkpoint}: mIoU {result['mIoU']:.2f}, mAcc {result['mAcc']:.2f}, aAcc "
             f"{result['aAcc']:.2f} on {len(eval_set)} images")
    return result
