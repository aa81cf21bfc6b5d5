"""Fine-tuning and evaluation of the STAR classifier (ARM's recipe, timm's APIs).

``finetune``: classifier (4 directions by default) initialised from a pretraining checkpoint
(positions interpolated, mixers widened), RandAugment, random erasing, mixup/cutmix, label
smoothing, drop path, layer-wise lr decay, EMA evaluated beside the raw weights, best-checkpoint
keeping, run by the :class:`~star_mamba.engine.trainer.Trainer`. ``run.linprobe`` freezes
everything but the linear head (head-only fine-tuning by SGD through the frozen backbone, with
the training data pipeline: for data whose features do not fit in memory; ``star-mamba
linprobe``, ``tasks/linprobe.py``, is the converged probe). ``evaluate_checkpoint``: top-1 and
top-5 of a saved classifier, on the data of the run that made it unless told otherwise.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from ..checkpoint import load_checkpoint, model_state
from ..config import RUNTIME_FIELDS, StarConfig
from ..data.build import classification_sets, describe_eval_data
from ..engine.config import RunConfig, load_config
from ..engine.loaders import eval_loader
from ..engine.run import maybe_compile, start_run
from ..engine.trainer import Trainer, TrainTask
from ..errors import CheckpointError, ConfigError
from ..evaluation.classification import evaluate
from ..models.classifier import StarClassifier
from ..models.convert import load_pretrained
from ..models.init import init_head_
from ..models.io import check_classifier, load_classifier
from ..seeding import seed_everything

log = logging.getLogger("star_mamba")


def classifier_config(cfg: RunConfig, num_classes: int) -> StarConfig:
    """The run's model config; ``num_classes``, when the config leaves it unset, is the
    dataset's, and when it sets it, it must be the dataset's."""
    model_cfg = cfg.model.star_config(num_classes=num_classes)
    if model_cfg.num_classes != num_classes:
        raise ConfigError(f"invalid config: model.num_classes={model_cfg.num_classes} but the "
                          f"dataset ({describe_eval_data(cfg.data)}) has {num_classes} classes; "
                          "leave model.num_classes unset to follow the dataset")
    return model_cfg


def check_config(cfg: RunConfig) -> bool:
    """The checks a fine-tuning config needs beyond its sections' own; whether mixup is on."""
    if cfg.task != "finetune":
        raise ConfigError(f"finetune() needs a fine-tuning config, got task {cfg.task!r}")
    o, r = cfg.optim, cfg.run
    mixup_on = (o.mixup > 0 or o.cutmix > 0) and not r.linprobe
    if mixup_on and o.batch_size % 2:
        raise ConfigError(f"invalid config: optim.batch_size={o.batch_size} must be even for "
                          "mixup/cutmix")
    return mixup_on


def finetune(cfg: RunConfig) -> dict[str, Any]:
    """Fine-tune a classifier (only its head with ``run.linprobe``); returns a summary with the
    best top-1."""
    mixup_on = check_config(cfg)
    o, r = cfg.optim, cfg.run
    train_set, eval_set, num_classes = classification_sets(cfg.data, cfg.model.star_config())
    model_cfg = classifier_config(cfg, num_classes)
    with start_run(cfg, trains=True) as ctx:  # the output folder stays locked till the end
        seed_everything(r.seed)
        model = StarClassifier(model_cfg)
        if r.pretrained:
            report = load_pretrained(model, r.pretrained)
            log.info(f"loaded {r.pretrained}: {report.summary()}")
            if r.head_init_std is not None and "head.weight" in report.new:
                init_head_(model.head, r.head_init_std)
        if r.linprobe:
            for name, p in model.named_parameters():
                p.requires_grad = name.startswith("head.")
        model.to(ctx.device)  # before the EMA copies it: the EMA lives where the model does

        mixup = (Mixup(mixup_alpha=o.mixup, cutmix_alpha=o.cutmix, prob=o.mixup_prob,
                       switch_prob=o.mixup_switch_prob, label_smoothing=o.smoothing,
                       num_classes=model_cfg.num_classes) if mixup_on else None)
        criterion = (SoftTargetCrossEntropy() if mixup is not None else
                     LabelSmoothingCrossEntropy(o.smoothing) if o.smoothing > 0
                     else torch.nn.CrossEntropyLoss())

        def loss_fn(m, images, targets):
            if mixup is not None:
                images, targets = mixup(images, targets)
            return criterion(m(images).float(), targets)

        ema = (ModelEmaV3(model, decay=r.ema_decay, device=ctx.device)
               if r.ema_decay and not r.linprobe else None)
        loader = eval_loader(eval_set, o.batch_size, ctx.info, cfg.data.num_workers)
        eval_model = maybe_compile(model, r, ctx.device)
        eval_ema = maybe_compile(ema.module, r, ctx.device) if ema is not None else None

        progress = r.progress and ctx.info.is_main

        def run_eval(epoch: int) -> dict[str, float]:
            metrics = evaluate(eval_model, loader, ctx.device, ctx.amp_dtype, progress=progress,
                               desc=f"epoch {epoch}/{o.epochs} eval")
            if eval_ema is not None:
                metrics.update({f"ema_{k}": v for k, v in evaluate(
                    eval_ema, loader, ctx.device, ctx.amp_dtype, progress=progress,
                    desc=f"epoch {epoch}/{o.epochs} eval (EMA)").items()})
            metrics["score"] = max(metrics["top1"], metrics.get("ema_top1", 0.0))
            return metrics

        task = TrainTask("STAR head-only fine-tuning" if r.linprobe else "STAR fine-tuning", model,
                         model_cfg, train_set, loss_fn, describe=f", {model_cfg.directions} "
                         f"directions, class token {model_cfg.class_token}, {num_classes} classes",
                         extras={"ema": ema} if ema is not None else {},
                         after_step=(lambda: ema.update(model)) if ema is not None else None,
                         evaluate=run_eval, loss_name="cross-entropy")
        return Trainer(cfg, ctx, task).train()


DEFAULT_EVAL_CONFIG = "finetune/fashion_mnist"
"""The data config for a checkpoint that holds no run config (e.g. one from convert-arm)."""


def evaluate_checkpoint(checkpoint: str | Path, cfg: Optional[RunConfig] = None,
                        use_ema: bool = False, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Top-1/top-5 of a fine-tuning checkpoint on its run's evaluation split.

    The model is the checkpoint's own (``model_config``; runtime fields such as
    ``model.scan_backend`` may come from the config). The data: ``cfg`` if given, else the run
    config saved in the checkpoint (``run_config``; :data:`DEFAULT_EVAL_CONFIG` for a checkpoint
    without one) with ``overrides`` (``section.key=value``) applied. A head whose class count is
    not the dataset's is refused.
    """
    saved = load_checkpoint(Path(checkpoint))
    if not isinstance(saved, dict):
        raise CheckpointError(f"{checkpoint} is not a checkpoint written by star-mamba")
    check_classifier(model_state(saved)[0], checkpoint, head=True)  # before reading its config
    note = None
    if cfg is None:
        run_config = saved.get("run_config")
        if not run_config:
            note = (f"{checkpoint} holds no run config (exported before export kept it, or "
                     f"converted): evaluating on the data of the built-in {DEFAULT_EVAL_CONFIG} "
                    "config; pass -c CONFIG (or --set data.KEY=VALUE) for other data")
        cfg = load_config(None if run_config else DEFAULT_EVAL_CONFIG, overrides, task="finetune",
                          base=run_config)
    runtime = {k: v for k, v in cfg.model.fields.items() if k in RUNTIME_FIELDS}
    model = load_classifier(saved, ema=use_ema, head=True, name=str(checkpoint), **runtime)
    _, eval_set, num_classes = classification_sets(cfg.data, model.cfg, train=False)
    if model.cfg.num_classes != num_classes:
        raise ConfigError(f"{checkpoint} is a {model.cfg.num_classes}-class classifier but the "
                          f"evaluation data ({describe_eval_data(cfg.data)}) has {num_classes} "
                          "classes; evaluate it on the data it was trained for (without -c, "
                          "eval reads the data config saved in the checkpoint)"
                          + (f". {note}" if note else ""))
    ctx = start_run(cfg, record=False)
    if note is not None:
        log.info(note)
    model = maybe_compile(model.to(ctx.device), cfg.run, ctx.device)
    result = evaluate(model, eval_loader(eval_set, cfg.optim.batch_size, ctx.info,
                                         cfg.data.num_workers), ctx.device, ctx.amp_dtype,
                      progress=cfg.run.progress and ctx.info.is_main)
    log.info(f"{checkpoint}{' (EMA)' if use_ema else ''}: top-1 {result['top1']:.2f}, "
             f"top-5 {result['top5']:.2f}, loss {result['loss']:.4f} on {len(eval_set)} images")
    return result
