"""STAR pretraining entry point: build the pretraining model and data, then :func:`fit`."""
from __future__ import annotations

from typing import Any

import torch

from ..models.pretrain import StarPretrain
from .config import RunConfig
from .data import build_pretrain_dataset
from .diagnostics import TrainingDiagnostics, check_diagnostics_config
from ..seeding import seed_everything
from .trainer import Job, check_run_config, fit, start_run


def pretrain_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(images).loss


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) a STAR pretraining run; returns a summary of the finished run."""
    check_run_config(cfg)
    model_cfg = cfg.model.star_config()
    model_cfg.validate_pretraining()
    k = model_cfg.images_per_sequence
    if cfg.optim.batch_size % k:
        raise ValueError(f"invalid config: optim.batch_size={cfg.optim.batch_size} must be a "
                         f"multiple of model.images_per_sequence={k} (images are packed K per "
                         "sequence)")
    # images, or whole sequences for data.sequence != random; fails early on missing data
    dataset = build_pretrain_dataset(cfg.data, model_cfg, cfg.run.seed)
    if cfg.run.diag_every:
        check_diagnostics_config(cfg.run.diag_images, model_cfg)
    ctx = start_run(cfg)
    seed_everything(cfg.run.seed)  # same initial weights on every rank
    model = StarPretrain(model_cfg)
    describe = (f", {k} images x {model_cfg.segments_per_image} segments = {model_cfg.seq_len} "
                f"tokens per sequence ({cfg.data.sequence} sequences)")
    # every run.diag_every steps on rank 0, as many sequences per forward as a micro-batch
    diagnose = (TrainingDiagnostics(cfg.data, model_cfg, cfg.run.diag_images,
                                    max(1, cfg.optim.batch_size // k), ctx.amp_dtype)
                if cfg.run.diag_every else None)
    return fit(cfg, ctx, Job("STAR pretraining", model, model_cfg, dataset, pretrain_loss,
                             describe=describe, diagnose=diagnose))
