"""STAR pretraining entry point: build the pretraining model and data, then :func:`fit`."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..models.pretrain import StarPretrain
from .config import RunConfig
from .data import build_pretrain_dataset
from .diagnostics import cross_image_diagnostics, held_out_images, summary_line
from ..seeding import seed_everything
from .trainer import Job, check_run_config, fit, start_run

log = logging.getLogger("star_mamba")


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
    # the diagnostics' fixed held-out batch, also built before anything runs
    held_out = (held_out_images(cfg.data, model_cfg, cfg.run.diag_images)
                if cfg.run.diag_every else None)
    ctx = start_run(cfg)
    seed_everything(cfg.run.seed)  # same initial weights on every rank
    model = StarPretrain(model_cfg)
    describe = (f", {k} images x {model_cfg.segments_per_image} segments = {model_cfg.seq_len} "
                f"tokens per sequence ({cfg.data.sequence} sequences)")
    diagnose = None
    if held_out is not None:
        per_forward = max(1, cfg.optim.batch_size // k)  # sequences, as in a training micro-batch

        def diagnose(m: torch.nn.Module) -> dict[str, Any]:
            start = time.perf_counter()
            values = cross_image_diagnostics(m, held_out, per_forward, ctx.amp_dtype)
            log.info(f"diagnostics on {values['images']} held-out images "
                     f"({time.perf_counter() - start:.1f}s): {summary_line(values)}")
            return values

    return fit(cfg, ctx, Job("STAR pretraining", model, model_cfg, dataset, pretrain_loss,
                             describe=describe, diagnose=diagnose))
