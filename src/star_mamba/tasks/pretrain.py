"""STAR pretraining: the model, data, loss and diagnostics of ``star-mamba pretrain``, run by the
:class:`~star_mamba.engine.trainer.Trainer`."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
from torch import Tensor

from ..config import StarConfig
from ..data.build import held_out_images, held_out_source, pretraining_set
from ..data.config import DataConfig
from ..engine.config import RunConfig
from ..engine.run import start_run
from ..engine.trainer import Trainer, TrainTask
from ..errors import ConfigError
from ..evaluation.diagnostics import cross_image_diagnostics, summary_line
from ..models.pretrain import StarPretrain
from ..seeding import seed_everything

log = logging.getLogger("star_mamba")


def pretrain_loss(model: torch.nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return model(images).loss


def check_config(cfg: RunConfig) -> StarConfig:
    """The checks a pretraining config needs beyond its sections' own; its model config."""
    if cfg.task != "pretrain":
        raise ConfigError(f"pretrain() needs a pretraining config, got task {cfg.task!r}")
    model_cfg = cfg.model.star_config()
    model_cfg.validate_pretraining()
    k = model_cfg.images_per_sequence
    if cfg.optim.batch_size % k:
        raise ConfigError(f"invalid config: optim.batch_size={cfg.optim.batch_size} must be a "
                          f"multiple of model.images_per_sequence={k} (images are packed K per "
                          "sequence)")
    if cfg.run.diag_every and cfg.run.diag_images < k:
        raise ConfigError(f"invalid config: run.diag_images={cfg.run.diag_images} is fewer than "
                          f"model.images_per_sequence={k}; raise it or set run.diag_every=0")
    return model_cfg


class TrainingDiagnostics:
    """What pretraining runs every ``run.diag_every`` steps, on rank 0: model -> the numbers of
    :func:`~star_mamba.evaluation.diagnostics.cross_image_diagnostics` (logged as one line
    too), or None when there are no held-out images.

    The held-out batch (:func:`~star_mamba.data.build.held_out_images`) is read at the first
    call, so a run that ends before never reads it and only rank 0 does. Diagnostics are an
    aid: when the eval split cannot be read (say an ImageFolder tree without ``val/``) the run
    warns once and trains on without them; an eval split smaller than ``run.diag_images`` is
    used whole (warned).
    """

    def __init__(self, data: DataConfig, model: StarConfig, num_images: int, batch_size: int,
                 amp_dtype: Optional[torch.dtype] = None):
        self.data, self.model_cfg, self.num_images = data, model, num_images
        self.batch_size, self.amp_dtype = batch_size, amp_dtype
        self.images: Optional[Tensor] = None
        self.unavailable = False

    def _load(self) -> None:
        try:
            with torch.random.fork_rng(devices=[]):  # reading images draws nothing; in case
                self.images = held_out_images(self.data, self.model_cfg, self.num_images,
                                              allow_fewer=True)
        except (FileNotFoundError, ValueError) as e:  # data, not config: that was checked
            self.unavailable = True
            log.warning(f"cross-image diagnostics off for this run: no held-out images "
                        f"({' '.join(str(e).split())}); set run.diag_every=0 to silence this")
            return
        wanted = self.num_images - self.num_images % self.model_cfg.images_per_sequence
        if len(self.images) < wanted:
            log.warning(f"run.diag_images={self.num_images} but only {len(self.images)} held-out "
                        f"images can be used ({held_out_source(self.data)})")

    def __call__(self, model: StarPretrain) -> Optional[dict[str, Optional[float]]]:
        if self.images is None and not self.unavailable:
            self._load()
        if self.unavailable:
            return None
        start = time.perf_counter()
        values = cross_image_diagnostics(model, self.images, self.batch_size, self.amp_dtype)
        log.info(f"diagnostics on {values['images']} held-out images "
                 f"({time.perf_counter() - start:.1f}s): {summary_line(values)}")
        return values


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) a STAR pretraining run; returns a summary of the finished run."""
    model_cfg = check_config(cfg)
    k = model_cfg.images_per_sequence
    # images, or whole sequences for data.sequence != random; fails early on missing data
    dataset = pretraining_set(cfg.data, model_cfg, cfg.run.seed)
    with start_run(cfg, trains=True) as ctx:  # the output folder stays locked till the end
        seed_everything(cfg.run.seed)  # same initial weights on every rank
        model = StarPretrain(model_cfg)
        describe = (f", {k} images x {model_cfg.segments_per_image} segments = {model_cfg.seq_len} "
                    f"tokens per sequence ({cfg.data.sequence} sequences)")
        # every run.diag_every steps on rank 0, as many sequences per forward as a micro-batch
        diagnose = (TrainingDiagnostics(cfg.data, model_cfg, cfg.run.diag_images,
                                        max(1, cfg.optim.batch_size // k), ctx.amp_dtype)
                    if cfg.run.diag_every else None)
        task = TrainTask("STAR pretraining", model, model_cfg, dataset, pretrain_loss,
                         describe=describe, diagnose=diagnose,
                         loss_name="MSE on per-patch-normalised pixels")
        return Trainer(cfg, ctx, task).train()
