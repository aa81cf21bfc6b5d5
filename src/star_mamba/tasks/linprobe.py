"""``star-mamba linprobe``: the converged linear probe and k-NN of a frozen backbone.

    run.pretrained: a STAR pretraining checkpoint, a fine-tuned classifier, or null (random
    weights drawn with run.seed: the "no pretraining" reference)
      -> the frozen classifier (models/io.probe_classifier; the checkpoint's own model)
      -> pooled features of data.split and of the evaluation split, both through the evaluation
         transform (no augmentation), extracted once and kept in run.output_dir
         (features-train.pt, features-test.pt) under a key naming the weights (the file's
         SHA-256), the model, the images and the extraction settings
      -> logistic regression with its weight-decay sweep, and k-NN (evaluation/)
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
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..checkpoint import atomic_save, write_json
from ..config import RUNTIME_FIELDS, StarConfig
from ..data.build import classification_sets
from ..data.config import DataConfig
from ..engine.config import RunConfig
from ..engine.run import record_config, start_run
from ..errors import CheckpointError, ConfigError, UserError
from ..evaluation.config import ProbeConfig
from ..evaluation.features import check_layers, extract_features
from ..evaluation.probe import probe_features, raw_pixel_baseline
from ..models.classifier import StarClassifier
from ..models.io import probe_classifier
from ..seeding import seed_everything
from .finetune import classifier_config

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
    data at its size (``classification_sets`` without augmentation).

    From a checkpoint: the checkpoint's own model (the config's ``model`` section gives only the
    runtime fields; other fields it sets that disagree are named in a warning). Without one: the
    config's model with random weights drawn from ``run.seed``.
    """
    if checkpoint is None:
        data = classification_sets(cfg.data, cfg.model.star_config(), augment=False)
        seed_everything(cfg.run.seed)
        model = StarClassifier(classifier_config(cfg, data[2]))
        return model, {"random_init_seed": cfg.run.seed}, data
    runtime = {k: v for k, v in cfg.model.fields.items() if k in RUNTIME_FIELDS}
    model = probe_classifier(checkpoint, **runtime)
    ignored = ignored_model_fields(cfg, model.cfg)
    if ignored:
        log.warning(f"the model is the checkpoint's ({checkpoint}); the config's "
                    f"{', '.join(ignored)} apply only to run.pretrained=null")
    data = classification_sets(cfg.data, model.cfg, augment=False)
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


def check_probe_layers(p: ProbeConfig, depth: int) -> None:
    if p.layers is not None and max(p.layers) > depth:
        raise ConfigError(f"invalid config: probe.layers={list(p.layers)}; the model has {depth} "
                          f"blocks (1-based indices 1..{depth}, or null for the last)")


# ------------------------------------------------------------------------------ features, cached

def cached_features(path: Optional[Path], key: Mapping[str, Any],
                    compute: Callable[[], tuple[Tensor, Tensor]]
                    ) -> tuple[Tensor, Tensor, bool]:
    """``compute()``'s (features, labels), kept in the file ``path`` under ``key``.

    A file made with an equal ``key`` (JSON-able: what the features depend on) is read back
    instead of computing: returns (features, labels, True). A file made with another key
    (another checkpoint, setting or dataset), or unreadable, is recomputed and replaced,
    atomically. ``path=None``: no cache.
    """
    if path is None:
        return (*compute(), False)
    text = json.dumps(key, sort_keys=True, default=str)
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: made again
            log.warning(f"cannot read the feature cache {path} ({type(e).__name__}); "
                        "extracting again")
            saved = {}
        if saved.get("key") == text:
            log.info(f"features read back from {path}")
            return saved["features"], saved["labels"], True
        if "key" in saved:
            old = json.loads(saved["key"])
            changed = sorted(k for k in {*old, *key} if old.get(k) != json.loads(text).get(k))
            log.info(f"{path} was made for another {', '.join(changed)}: extracting again")
    x, y = compute()
    atomic_save({"key": text, "features": x, "labels": y}, path)
    return x, y, False


def evaluate_representation(model: Union[StarClassifier, str, Path, Mapping[str, Any]],
                            train_set: Dataset, test_set: Dataset,
                            probe: ProbeConfig = ProbeConfig(), *, seed: int = 0,
                            device: Optional[Union[str, torch.device]] = None,
                            amp_dtype: Optional[torch.dtype] = None, num_workers: int = 0,
                            knn_standardize: bool = False, progress: bool = True,
                            model_overrides: Optional[Mapping[str, Any]] = None,
                            cache_dir: Optional[Union[str, Path]] = None,
                            cache_key: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Linear probe (converged logistic regression) and k-NN of a frozen backbone, with the
    settings of ``probe``: the orchestration behind :func:`linprobe` and the experiments.

    ``model``: a built :class:`StarClassifier`, or a checkpoint (path or dict) given to
    :func:`~star_mamba.models.io.probe_classifier` with ``model_overrides``. Features of
    ``train_set`` and ``test_set`` (evaluation transforms: no augmentation) are extracted once
    on ``device`` (default: CUDA when available), then probed on the same device; the probes
    are scored on ``test_set``. ``cache_dir``: keep the features in ``features-train.pt`` /
    ``features-test.pt`` there (:func:`cached_features`), under ``cache_key`` (required with
    it: what identifies the weights and the images) plus the extraction settings and the
    split's size. Returns ``dict(linear_probe_top1, knn_top1, weight_decay, heldout_top1,
    n_train, n_test, feature_dim, seconds, ...)`` (top-1 in percent; the rest: sweep,
    convergence, timings, which splits came from the cache), JSON-serialisable.
    """
    if cache_dir is not None and cache_key is None:
        raise ValueError("cache_dir needs a cache_key naming the weights and the data")
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(model, StarClassifier):
        model = probe_classifier(model, **dict(model_overrides or {}))
    elif model_overrides:
        raise ValueError("model_overrides only apply when model is a checkpoint")
    layers = None if probe.layers is None else check_layers(probe.layers, len(model.backbone.blocks))
    kw = dict(batch_size=probe.batch_size, device=device, layers=layers, pool=probe.pool,
              amp_dtype=amp_dtype, num_workers=num_workers, progress=progress)
    settings = dict(layers=layers, pool=probe.pool, amp=str(amp_dtype), norm=True)
    original = next(model.parameters()).device
    cached = {}
    features = {}
    try:
        for split, dataset in (("train", train_set), ("test", test_set)):
            def compute(dataset=dataset, split=split) -> tuple[Tensor, Tensor]:
                model.to(device)
                return extract_features(model, dataset, desc=f"features ({split})", **kw)
            path = None if cache_dir is None else Path(cache_dir) / f"features-{split}.pt"
            key = {**dict(cache_key or {}), **settings, "split": split, "images": len(dataset)}
            *features[split], cached[split] = cached_features(path, key, compute)
    finally:
        model.to(original)
    t1 = time.perf_counter()
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    out = probe_features(train_x, train_y, test_x, test_y, probe, seed=seed,
                         knn_standardize=knn_standardize, device=device)
    out.update(layers=layers, pool=probe.pool, features_cached=cached, seconds_features=t1 - t0,
               seconds=time.perf_counter() - t0)
    log.info(f"linear probe top-1 {out['linear_probe_top1']:.2f} (wd {out['weight_decay']:g}, "
             f"{out['lr_iterations']} L-BFGS iterations), {probe.knn_k}-NN top-1 "
             f"{out['knn_top1']:.2f}, {out['n_train']} train / {out['n_test']} test, "
             f"{out['feature_dim']} features, {out['seconds']:.0f} s")
    return out


# ------------------------------------------------------------------------------ the command

def linprobe(cfg: RunConfig) -> dict[str, Any]:
    """Probe the frozen backbone of ``run.pretrained`` on the configured data; see the module
    docstring. Returns the result written to ``run.output_dir/linprobe.json``."""
    if cfg.task != "linprobe":
        raise ConfigError(f"linprobe() needs a linprobe config, got task {cfg.task!r}")
    t0 = time.perf_counter()
    checkpoint = checkpoint_path(cfg.run.pretrained)  # before any file is written
    with start_run(cfg) as ctx:  # the output folder stays locked till the end
        record_config(cfg, ctx)
        if ctx.info.world_size > 1:
            raise UserError("star-mamba linprobe runs in one process (the features are extracted "
                            "once, the fit is full-batch); start it without torchrun")
        model, weights, (train_set, eval_set, num_classes) = probe_model(cfg, checkpoint)
        p = cfg.probe
        check_probe_layers(p, model.cfg.depth)
        log.info(f"linear probe of {checkpoint or f'a random backbone (seed {cfg.run.seed})'}: "
                 f"{model.cfg.embed_dim} wide, {model.cfg.depth} blocks, pool {p.pool}, layers "
                 f"{list(p.layers) if p.layers else 'last'}; {len(train_set)} train / "
                 f"{len(eval_set)} {cfg.data.resolved_eval_split} images")
        model_id = {k: v for k, v in model.cfg.to_dict().items()
                    if k not in RUNTIME_FIELDS and k != "num_classes"}
        result = evaluate_representation(
            model, train_set, eval_set, p, seed=cfg.run.seed, device=ctx.device,
            amp_dtype=ctx.amp_dtype, num_workers=cfg.data.num_workers, progress=cfg.run.progress,
            cache_dir=ctx.output_dir if p.cache_features else None,
            cache_key=dict(weights=weights, model=model_id, data=data_identity(cfg.data)))
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
    train_set, eval_set, _ = classification_sets(cfg.data, model_cfg, augment=False)
    result = raw_pixel_baseline(train_set, eval_set, p, seed=cfg.run.seed,
                                num_workers=cfg.data.num_workers, device=ctx.device,
                                knn_standardize=True, progress=cfg.run.progress)
    log.info(f"raw pixels: linear probe top-1 {result['linear_probe_top1']:.2f}, "
             f"{p.knn_k}-NN top-1 {result['knn_top1']:.2f} ({result['n_train']} train / "
             f"{result['n_test']} test images, {result['seconds']:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, dict(key=key, result=result))
    return result
