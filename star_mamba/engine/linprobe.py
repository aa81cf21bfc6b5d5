"""``star-mamba linprobe``: the converged linear probe and k-NN of a frozen backbone.

    run.pretrained: a STAR pretraining checkpoint, a fine-tuned classifier, or null (random
    weights drawn with run.seed: the "no pretraining" reference)
      -> the frozen classifier (probe.classifier_from_checkpoint; the checkpoint's own model)
      -> pooled features of data.split and of the evaluation split, both through the evaluation
         transform (no augmentation), extracted once and kept in run.output_dir
         (features-train.pt, features-test.pt) under a key naming the weights (the file's
         SHA-256), the model, the images and the extraction settings
      -> logistic regression with its weight-decay sweep, and k-NN (engine/probe.py)
      -> run.output_dir/linprobe.json, a line in log.txt, the summary returned

A re-run with the same checkpoint and settings reads the features back (also after an
interruption between the extraction and the fit); anything else extracts them again.
:func:`pixel_baseline` scores the same probes on the raw pixels of the same images, once: its
result is kept in a JSON file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from torch.utils.data import Dataset

from ..checkpoint import write_json
from ..config import RUNTIME_FIELDS, StarConfig
from ..errors import CheckpointError, ConfigError, UserError
from ..models.classifier import StarClassifier
from ..seeding import seed_everything
from .config import DataConfig, ProbeConfig, RunConfig
from .finetune import build_datasets, classifier_config
from .probe import (PRECISIONS, classifier_from_checkpoint, evaluate_representation,
                    raw_pixel_baseline)
from .trainer import start_run

log = logging.getLogger("star_mamba")

RESULT = "linprobe.json"


# ------------------------------------------------------------------------------ inputs

def checkpoint_path(pretrained: Optional[str]) -> Optional[Path]:
    """``run.pretrained`` as an existing file, or None (random weights); one clear line if not."""
    if pretrained is None:
        return None
    path = Path(pretrained)
    if path.is_dir():
        raise CheckpointError(f"run.pretrained={pretrained} is a directory; give the checkpoint "
                              f"file in it, e.g. {path / 'checkpoint-latest.pth'}")
    if not path.is_file():
        raise CheckpointError(f"run.pretrained={pretrained}: no such file (a STAR pretraining "
                              "checkpoint or a fine-tuned classifier; null probes a randomly "
                              "initialised backbone)")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def probe_model(cfg: RunConfig, checkpoint: Optional[Path]
                ) -> tuple[StarClassifier, dict[str, Any], tuple[Dataset, Dataset, int]]:
    """The frozen classifier, what identifies its weights (for the feature cache), and the
    data at its size (:func:`build_datasets` without augmentation).

    From a checkpoint: the checkpoint's own model (the config's ``model`` section gives only the
    runtime fields; other fields it sets that disagree are named in a warning). Without one: the
    config's model with random weights drawn from ``run.seed``.
    """
    if checkpoint is None:
        data = build_datasets(cfg.data, cfg.model.star_config(), augment=False)
        seed_everything(cfg.run.seed)
        model = StarClassifier(classifier_config(cfg, data[2]))
        return model, {"random_init_seed": cfg.run.seed}, data
    runtime = {k: v for k, v in cfg.model.fields.items() if k in RUNTIME_FIELDS}
    model = classifier_from_checkpoint(checkpoint, **runtime)
    ignored = ignored_model_fields(cfg, model.cfg)
    if ignored:
        log.warning(f"the model is the checkpoint's ({checkpoint}); the config's "
                    f"{', '.join(ignored)} apply only to run.pretrained=null")
    data = build_datasets(cfg.data, model.cfg, augment=False)
    return model, {"sha256": file_sha256(checkpoint)}, data


def ignored_model_fields(cfg: RunConfig, model_cfg: StarConfig) -> list[str]:
    """``model.<field>=<value>`` items the config sets (or its size implies) that differ from the
    checkpoint's model."""
    wanted, have = cfg.model.star_config().to_dict(), model_cfg.to_dict()
    named = (set(cfg.model.fields) | {"embed_dim", "depth"}) - RUNTIME_FIELDS - {"num_classes"}
    return [f"model.{k}={wanted[k]!r} (checkpoint: {have.get(k)!r})" for k in sorted(named)
            if wanted.get(k) != have.get(k)]


def data_identity(data: DataConfig) -> dict[str, Any]:
    """The data settings the probe's images depend on (besides the model's size and channels,
    and the counts, which the cache key holds too)."""
    return dict(name=data.name, root=data.root, split=data.split,
                eval_split=data.resolved_eval_split, crop_pct=data.crop_pct)


def fit_options(p: ProbeConfig, seed: int) -> dict[str, Any]:
    """The logistic-regression and k-NN options of :func:`engine.probe.probe_features`."""
    return dict(weight_decays=p.weight_decays, val_fraction=p.heldout_fraction,
                max_iter=p.max_iter, tolerance_grad=p.tolerance, dtype=PRECISIONS[p.precision],
                seed=seed, knn_k=p.knn_k, knn_temperature=p.knn_temperature)


def check_layers(p: ProbeConfig, depth: int) -> None:
    if p.layers is not None and max(p.layers) > depth:
        raise ConfigError(f"invalid config: probe.layers={list(p.layers)}; the model has {depth} "
                          f"blocks (1-based indices 1..{depth}, or null for the last)")


# ------------------------------------------------------------------------------ the command

def linprobe(cfg: RunConfig) -> dict[str, Any]:
    """Probe the frozen backbone of ``run.pretrained`` on the configured data; see the module
    docstring. Returns the result written to ``run.output_dir/linprobe.json``."""
    if cfg.task != "linprobe":
        raise ValueError(f"linprobe() needs a linprobe config, got task {cfg.task!r}")
    t0 = time.perf_counter()
    checkpoint = checkpoint_path(cfg.run.pretrained)  # before any file is written
    ctx = start_run(cfg)
    if ctx.info.world_size > 1:
        raise UserError("star-mamba linprobe runs in one process (the features are extracted "
                        "once, the fit is full-batch); start it without torchrun")
    model, weights, (train_set, eval_set, num_classes) = probe_model(cfg, checkpoint)
    p = cfg.probe
    check_layers(p, model.cfg.depth)
    log.info(f"linear probe of {checkpoint or f'a random backbone (seed {cfg.run.seed})'}: "
             f"{model.cfg.embed_dim} wide, {model.cfg.depth} blocks, pool {p.pool}, layers "
             f"{list(p.layers) if p.layers else 'last'}; {len(train_set)} train / "
             f"{len(eval_set)} {cfg.data.resolved_eval_split} images")
    model_id = {k: v for k, v in model.cfg.to_dict().items()
                if k not in RUNTIME_FIELDS and k != "num_classes"}
    result = evaluate_representation(
        model, train_set, eval_set, batch_size=p.batch_size, device=ctx.device, layers=p.layers,
        pool=p.pool, amp_dtype=ctx.amp_dtype, num_workers=cfg.data.num_workers,
        progress=cfg.run.progress, cache_dir=ctx.output_dir if p.cache_features else None,
        cache_key=dict(weights=weights, model=model_id, data=data_identity(cfg.data)),
        **fit_options(p, cfg.run.seed))
    result.update(checkpoint=str(checkpoint) if checkpoint else None, **weights,
                  eval_split=cfg.data.resolved_eval_split, num_classes=num_classes,
                  model=model.cfg.to_dict(), config=cfg.to_dict(),
                  seconds=time.perf_counter() - t0)
    write_json(ctx.output_dir / RESULT, result)
    log.info(f"wrote {ctx.output_dir / RESULT}")
    return result


def pixel_baseline(cfg: RunConfig, path: Path) -> dict[str, Any]:
    """The probes of :func:`linprobe` on the raw pixels of the same images (the config's data at
    its model's size and channels), kept in the JSON file ``path``: a file made with the same
    data and probe settings is read back, any other is recomputed and replaced."""
    path = Path(path)
    model_cfg = cfg.model.star_config()
    p = cfg.probe
    key = dict(data=data_identity(cfg.data), img_size=model_cfg.img_size,
               in_chans=model_cfg.in_chans, max_images=cfg.data.max_images,
               max_eval_images=cfg.data.max_eval_images,
               probe={k: v for k, v in vars(p).items()
                      if k not in ("pool", "layers", "batch_size", "cache_features")},
               seed=cfg.run.seed)
    key = json.loads(json.dumps(key))  # tuples as lists: as read back
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
        log.info(f"{path} was made for other data or probe settings: computing it again")
    ctx = start_run(cfg, record=False)
    train_set, eval_set, _ = build_datasets(cfg.data, model_cfg, augment=False)
    result = raw_pixel_baseline(train_set, eval_set, num_workers=cfg.data.num_workers,
                                device=ctx.device, knn_standardize=True,
                                progress=cfg.run.progress, **fit_options(p, cfg.run.seed))
    log.info(f"raw pixels: linear probe top-1 {result['linear_probe_top1']:.2f}, "
             f"{p.knn_k}-NN top-1 {result['knn_top1']:.2f} ({result['n_train']} train / "
             f"{result['n_test']} test images, {result['seconds']:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(key=key, result=result))
    return result
