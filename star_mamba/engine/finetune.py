"""Fine-tuning and evaluation of the STAR classifier (ARM's recipe, timm's APIs).

``finetune``: classifier (4 directions by default) initialised from a pretraining checkpoint
(positions interpolated, mixers widened), RandAugment, random erasing, mixup/cutmix, label
smoothing, drop path, layer-wise lr decay, EMA evaluated beside the raw weights, best-checkpoint
keeping. ``run.linprobe`` freezes everything but the linear head (head-only fine-tuning by SGD
through the frozen backbone, with the training data pipeline: for data whose features do not
fit in memory; ``star-mamba linprobe``, ``engine/linprobe.py``, is the converged probe).
``evaluate_checkpoint``: top-1 and top-5 of a saved classifier, on the data of the run that made
it unless told otherwise. :func:`build_datasets` is also the probe's data.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import StarConfig
from ..data import FashionMNIST, ShardSet, build_dataset
from ..data import fashion_mnist as fm
from ..data.transforms import build_eval_transform
from ..models.classifier import StarClassifier
from ..models.convert import load_pretrained
from ..models.init import init_head_
from ..checkpoint import load_checkpoint
from ..config import RUNTIME_FIELDS
from ..errors import CheckpointError, ConfigError
from .config import DataConfig, RunConfig, load_config
from .data import RGB_DATASETS, check_rgb_data, rgb_options
from .dist import DistInfo, all_reduce_mean
from ..seeding import seed_everything
from .trainer import Job, check_run_config, fit, maybe_compile, start_run

log = logging.getLogger("star_mamba")


# ------------------------------------------------------------------------------ data

class _ToChannels:
    """After timm's RGB pipeline: keep ``in_chans`` channels (1 for grey images)."""

    def __init__(self, in_chans: int):
        self.in_chans = in_chans

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[: self.in_chans]


def build_train_transform(data: DataConfig, model: StarConfig, mean, std):
    """timm's training pipeline on RGB PIL images (grey images are converted, then reduced)."""
    import torchvision.transforms as T
    t = create_transform(model.img_size, is_training=True, scale=tuple(data.scale),
                         auto_augment=data.auto_augment, interpolation="bicubic",
                         re_prob=data.reprob, re_mode="pixel", re_count=1,
                         mean=tuple(mean) * (3 // len(mean)), std=tuple(std) * (3 // len(std)))
    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), t, _ToChannels(model.in_chans)])


def build_datasets(data: DataConfig, model: StarConfig, train: bool = True,
                   augment: bool = True) -> tuple[Optional[Dataset], Dataset, int]:
    """(train set or None, eval set, number of classes), ``data.max_images`` /
    ``data.max_eval_images`` applied. ``augment=False``: the training split goes through the
    evaluation transform (a probe's features)."""
    if data.name == "fashion_mnist":
        augmented = train and augment
        tf = build_train_transform(data, model, (fm.MEAN,), (fm.STD,)) if augmented else None
        train_set = (FashionMNIST(data.root, data.split, model.img_size, model.in_chans,
                                  download=data.download, pil_transform=tf) if train else None)
        eval_set = FashionMNIST(data.root, data.resolved_eval_split, model.img_size,
                                model.in_chans, download=data.download)
        num_classes = len(fm.CLASSES)
    elif data.name in RGB_DATASETS:  # imagefolder, shards, hf
        check_rgb_data(data, model)
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        eval_tf = build_eval_transform(model.img_size, data.crop_pct)
        train_tf = (build_train_transform(data, model, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
                    if augment else eval_tf)
        train_set = (build_dataset(data.name, root=data.root, split=data.split,
                                   transform=train_tf, **rgb_options(data)) if train else None)
        eval_set = build_dataset(data.name, root=data.root, split=data.resolved_eval_split,
                                 transform=eval_tf, **rgb_options(data))
        num_classes = len(eval_set.classes)
    else:
        raise ConfigError(f"invalid config: data.name={data.name!r} for fine-tuning, linprobe "
                          f"and eval; allowed: 'fashion_mnist', {', '.join(map(repr, RGB_DATASETS))}")
    if train_set is not None and data.max_images is not None:
        train_set = _first(train_set, data.max_images)
    if data.max_eval_images is not None:
        eval_set = _first(eval_set, data.max_eval_images)
    return train_set, eval_set, num_classes


def _first(dataset, n: int):
    """The first ``n`` items of a dataset (of a shard stream: in index order)."""
    if isinstance(dataset, ShardSet):
        return dataset.limited(n)
    return Subset(dataset, range(min(n, len(dataset))))


# ------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy; exact over ranks (counts are summed)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss sum
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hit = top5 == targets[:, None]
        totals += torch.stack([torch.full((), len(targets), device=device), hit[:, 0].sum(),
                               hit.any(1).sum(),
                               F.cross_entropy(logits, targets, reduction="sum")]).double()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    totals = all_reduce_mean(totals) * world
    n = max(totals[0].item(), 1)
    return dict(top1=100 * totals[1].item() / n, top5=100 * totals[2].item() / n,
                loss=totals[3].item() / n)


def eval_loader(dataset: Dataset, batch_size: int, info: DistInfo, num_workers: int) -> DataLoader:
    """Each rank takes every world_size-th image (a shard stream: a contiguous share), so the
    summed counts are exact."""
    if isinstance(dataset, ShardSet):
        return dataset.eval_loader(batch_size, info.rank, info.world_size, num_workers)
    indices = list(range(info.rank, len(dataset), info.world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers)


# ------------------------------------------------------------------------------ fine-tuning

def describe_eval_data(data: DataConfig) -> str:
    """Which images evaluation reads, for messages."""
    where = f", data.root={data.root}" if data.root is not None else ""
    return f"data.name={data.name}{where}, split {data.resolved_eval_split!r}"


def classifier_config(cfg: RunConfig, num_classes: int) -> StarConfig:
    """The run's model config; ``num_classes``, when the config leaves it unset, is the
    dataset's, and when it sets it, it must be the dataset's."""
    model_cfg = cfg.model.star_config(num_classes=num_classes)
    if model_cfg.num_classes != num_classes:
        raise ConfigError(f"invalid config: model.num_classes={model_cfg.num_classes} but the "
                          f"dataset ({describe_eval_data(cfg.data)}) has {num_classes} classes; "
                          "leave model.num_classes unset to follow the dataset")
    return model_cfg


def finetune(cfg: RunConfig) -> dict[str, Any]:
    """Fine-tune a classifier (only its head with ``run.linprobe``); returns a summary with the
    best top-1."""
    if cfg.task != "finetune":
        raise ValueError(f"finetune() needs a fine-tuning config, got task {cfg.task!r}")
    check_run_config(cfg)
    o, r = cfg.optim, cfg.run
    train_set, eval_set, num_classes = build_datasets(cfg.data, _peek_model(cfg))
    model_cfg = classifier_config(cfg, num_classes)
    mixup_on = (o.mixup > 0 or o.cutmix > 0) and not r.linprobe
    if mixup_on and o.batch_size % 2:
        raise ValueError(f"invalid config: optim.batch_size={o.batch_size} must be even for "
                         "mixup/cutmix")
    ctx = start_run(cfg)
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
                 LabelSmoothingCrossEntropy(o.smoothing) if o.smoothing > 0 else torch.nn.CrossEntropyLoss())

    def loss_fn(m, images, targets):
        if mixup is not None:
            images, targets = mixup(images, targets)
        return criterion(m(images).float(), targets)

    ema = (ModelEmaV3(model, decay=r.ema_decay, device=ctx.device)
           if r.ema_decay and not r.linprobe else None)
    loader = eval_loader(eval_set, o.batch_size, ctx.info, cfg.data.num_workers)
    eval_model = maybe_compile(model, r)
    eval_ema = maybe_compile(ema.module, r) if ema is not None else None

    def run_eval(epoch: int) -> dict[str, float]:
        metrics = evaluate(eval_model, loader, ctx.device, ctx.amp_dtype)
        if eval_ema is not None:
            metrics.update({f"ema_{k}": v for k, v in
                            evaluate(eval_ema, loader, ctx.device, ctx.amp_dtype).items()})
        metrics["score"] = max(metrics["top1"], metrics.get("ema_top1", 0.0))
        return metrics

    job = Job("STAR head-only fine-tuning" if r.linprobe else "STAR fine-tuning", model, model_cfg,
              train_set, loss_fn, describe=f", {model_cfg.directions} directions, "
              f"class token {model_cfg.class_token}, {num_classes} classes",
              extras={"ema": ema} if ema is not None else {},
              after_step=(lambda: ema.update(model)) if ema is not None else None,
              evaluate=run_eval)
    return fit(cfg, ctx, job)


def _peek_model(cfg: RunConfig) -> StarConfig:
    """The classifier config before the dataset's class count is known (for transforms)."""
    return cfg.model.star_config()


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
    if not isinstance(saved, dict) or "model_config" not in saved \
            or "head.weight" not in saved.get("model", {}):
        raise CheckpointError(f"{checkpoint} is not a classifier checkpoint written by star-mamba "
                              "finetune (pretraining checkpoints have no classifier head)")
    if cfg is None:
        run_config = saved.get("run_config")
        cfg = load_config(None if run_config else DEFAULT_EVAL_CONFIG, overrides, task="finetune",
                          base=run_config)
    runtime = {k: v for k, v in cfg.model.fields.items() if k in RUNTIME_FIELDS}
    model_cfg = StarConfig.from_dict({**saved["model_config"], **runtime})
    _, eval_set, num_classes = build_datasets(cfg.data, model_cfg, train=False)
    if model_cfg.num_classes != num_classes:
        raise ConfigError(f"{checkpoint} is a {model_cfg.num_classes}-class classifier but the "
                          f"evaluation data ({describe_eval_data(cfg.data)}) has {num_classes} "
                          "classes; evaluate it on the data it was trained for (without -c, "
                          "eval reads the data config saved in the checkpoint)")
    model = StarClassifier(model_cfg)
    weights = saved["model"]
    if use_ema:
        if "ema" not in saved.get("extras", {}):
            raise CheckpointError(f"{checkpoint} holds no EMA weights (runs with "
                                  "run.ema_decay=null or run.linprobe keep none); evaluate "
                                  "without --ema")
        weights = {k[len("module."):]: v for k, v in saved["extras"]["ema"].items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"the weights in {checkpoint} do not fit its model config: "
                              f"{' '.join(str(e).split())}") from e
    ctx = start_run(cfg, record=False)
    model = maybe_compile(model.to(ctx.device), cfg.run)
    result = evaluate(model, eval_loader(eval_set, cfg.optim.batch_size, ctx.info,
                                         cfg.data.num_workers), ctx.device, ctx.amp_dtype)
    log.info(f"{checkpoint}{' (EMA)' if use_ema else ''}: top-1 {result['top1']:.2f}, "
             f"top-5 {result['top5']:.2f}, loss {result['loss']:.4f} on {len(eval_set)} images")
    return result
