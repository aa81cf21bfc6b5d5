"""The training engine shared by pretraining and fine-tuning (MAE's split: entry points in
``pretrain.py`` / ``finetune.py``, the loop over one epoch and the run bookkeeping here).

A task describes itself as a :class:`Job` (model, dataset, loss, optional extras such as an EMA
and an evaluation); :func:`fit` does the rest: devices and process groups, the optimizer and
its schedule, resume, checkpoints, metrics. The same code runs as one CPU process or as many
GPU processes under ``torchrun``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import StarConfig
from .. import checkpoint as ckpt
from ..data.sequences import ReportedSequences, SequenceDataset, collate_sequences_reported
from ..data.shards import ShardSet
from .config import RunConfig, RunOptions, save_config
from .dist import (DistInfo, all_reduce_mean, all_reduce_sum, barrier, cleanup, env_local_rank,
                   init_distributed, resolve_device)
from .lr_sched import lr_at, set_lr
from .metrics import MetricWriter, plot_loss_curve
from ..seeding import block_seed, seed_everything
from .sampler import BlockShardSampler, EpochIndexSampler, SeededDataset, collate_reported

log = logging.getLogger("star_mamba")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    step: int = 0  # optimizer steps taken in total
    nonfinite_in_row: int = 0
    bad_in_epoch: int = 0  # unreadable images met in the current epoch, over all ranks


class BadImages:
    """Unreadable images met in training, counted over every worker and rank.

    The dataset reports an unreadable image with the batch that replaced it (``folder.py``:
    each dataset index reports its own file, so each bad file counts once per epoch, on the
    one rank whose block holds it; sequence kinds that draw images with replacement report it
    each time it is drawn, out of ``len(sequences) x K`` images). The training loop adds up
    its micro-batches' reports and folds the count into the all-reduce it already does once
    per optimizer step, so every rank holds the same global ``state.bad_in_epoch`` and stops
    at the same step once it exceeds ``data.max_bad_fraction`` x dataset size. The count is
    saved with the state, so a resumed epoch keeps it. Each rank names its own bad files in
    the log, once each.
    """

    def __init__(self, max_fraction: float, dataset_size: int):
        self.max_fraction, self.dataset_size = max_fraction, dataset_size
        self.named: dict[str, str] = {}  # path -> reason, named in this process's log
        self.last = ""

    def note(self, reports: list[tuple[int, str, str]]) -> int:
        """Log the newly met files among ``reports`` ((index, path, reason)); their number."""
        for index, path, reason in reports:
            self.last = f"{path} ({reason})"
            if path not in self.named:
                self.named[path] = reason
                log.warning(f"unreadable image {path} ({reason}; dataset index {index}): "
                            "replaced by the next readable image")
        return len(reports)

    def count(self, state: TrainState, new: int) -> None:
        """Add ``new`` (summed over ranks) to the epoch's count; stop past the limit."""
        state.bad_in_epoch += new
        if state.bad_in_epoch > self.max_fraction * self.dataset_size:
            raise RuntimeError(
                f"{state.bad_in_epoch} unreadable images in epoch {state.epoch} (all ranks) of "
                f"{self.dataset_size}: more than data.max_bad_fraction={self.max_fraction}; "
                f"stopping before step {state.step + 1}, the last checkpoint is untouched. Last "
                f"one met here: {self.last or '(on another rank)'}")


def setup_logging(output_dir: Optional[Path], is_main: bool) -> None:
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None and is_main:
        handlers.append(logging.FileHandler(output_dir / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)


def rng_state() -> dict[str, Any]:
    """Every random generator training touches, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    choices = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ValueError(f"invalid run.amp={amp!r}; allowed: 'auto', 'off', 'bf16', 'fp16'")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("run.amp='fp16' needs a CUDA device; use 'bf16' or 'off' on CPU")
    return choices[amp]


def check_run_config(cfg: RunConfig) -> None:
    o, r = cfg.optim, cfg.run
    if o.batch_size <= 0:
        raise ValueError(f"invalid config: optim.batch_size={o.batch_size!r}; expected a positive integer")
    for name in ("accum_iter", "epochs"):
        if getattr(o, name) <= 0:
            raise ValueError(f"invalid config: optim.{name}={getattr(o, name)!r}; expected a positive integer")
    if (o.lr if o.lr is not None else o.blr) <= 0:
        raise ValueError(f"invalid config: optim.{'lr' if o.lr is not None else 'blr'}="
                         f"{o.lr if o.lr is not None else o.blr!r}; expected a positive learning rate")
    if o.min_lr < 0 or o.weight_decay < 0 or o.warmup_epochs < 0:
        raise ValueError("invalid config: optim.min_lr, optim.weight_decay and optim.warmup_epochs "
                         "must be >= 0")
    if o.clip_grad is not None and o.clip_grad <= 0:
        raise ValueError(f"invalid config: optim.clip_grad={o.clip_grad!r}; expected > 0 or null")
    if r.seed < 0:
        raise ValueError(f"invalid config: run.seed={r.seed!r}; expected an integer >= 0")
    if r.head_init_std is not None and not r.head_init_std > 0:
        raise ValueError(f"invalid config: run.head_init_std={r.head_init_std!r}; expected a "
                         "positive std or null (keep the model's head init)")
    if r.save_every <= 0 or r.save_every_steps <= 0 or r.log_every <= 0 or r.eval_every <= 0:
        raise ValueError("invalid config: run.save_every, run.save_every_steps, run.log_every and "
                         "run.eval_every must be positive")
    if r.diag_every is not None and r.diag_every < 0:
        raise ValueError(f"invalid config: run.diag_every={r.diag_every!r}; expected steps >= 1, "
                         "or 0 / null for no diagnostics")
    if r.diag_images <= 0:
        raise ValueError(f"invalid config: run.diag_images={r.diag_images!r}; expected a positive "
                         "number of held-out images")


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer, scaler,
                    state: TrainState, cfg: RunConfig, device: torch.device,
                    amp_dtype: Optional[torch.dtype], base_lr: float, steps_per_epoch: int,
                    writer: MetricWriter, info: DistInfo, loss_fn: Callable,
                    on_step: Optional[Callable] = None,
                    bad_images: Optional[BadImages] = None) -> Optional[float]:
    """One pass over ``loader`` from ``state.batch_in_epoch``. Returns the epoch's mean loss.

    ``loss_fn(model, images, targets)`` gives the loss of one micro-batch (pretraining: the
    model's own loss; fine-tuning: mixup + cross-entropy); ``on_step()`` runs after each
    optimizer step (checkpoints, EMA). The random draws of each micro-batch (drop path, mixup)
    are seeded from its global block (see ``sampler.py``). The host waits for the device once
    per optimizer step (the finiteness check and the unreadable-image count, see
    :class:`BadImages`) and for the loss only on logging steps.
    """
    o, r = cfg.optim, cfg.run
    sampler: BlockShardSampler = loader.sampler
    bad_images = bad_images or BadImages(float("inf"), sampler.num_samples)  # count, never stop
    bad_window = 0  # unreadable images in the micro-batches since the last step
    model.train()
    accum = o.accum_iter
    logged_sum = torch.zeros((), device=device)  # micro-batch losses since the last log line
    window_sum = torch.zeros((), device=device)  # losses of the current accumulation window
    logged_steps, epoch_sum, epoch_steps = 0, 0.0, 0
    t_last, images_since = time.perf_counter(), 0
    bar = tqdm(total=steps_per_epoch * accum, initial=state.batch_in_epoch, leave=False,
               disable=not (r.progress and info.is_main), desc=f"epoch {state.epoch}",
               dynamic_ncols=True, file=sys.stdout)
    for (images, targets), bad in loader:
        bad_window += bad_images.note(bad)
        micro = state.batch_in_epoch % accum
        if micro == 0:
            lr = lr_at(state.epoch + state.batch_in_epoch / (steps_per_epoch * accum), base_lr,
                       o.min_lr, o.warmup_epochs, o.epochs)
            set_lr(optimizer, lr)
        seed_everything(block_seed(r.seed, state.epoch, sampler.global_block(state.batch_in_epoch)))
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        last_micro = micro == accum - 1
        sync = model.no_sync() if (info.enabled and not last_micro) else contextlib.nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = loss_fn(model, images, targets)
            # Backward even when the loss is not finite: whether it is is only read once per
            # step, and the step is then skipped with the weights untouched.
            scaler.scale(loss / accum).backward()
        # NaN and inf survive summation, so the window's sum is finite iff every loss was.
        loss_d = loss.detach().float()
        window_sum = loss_d if micro == 0 else window_sum + loss_d
        state.batch_in_epoch += 1
        images_since += images.shape[0] * info.world_size
        bar.update(1)
        if not last_micro:
            continue
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), o.clip_grad if o.clip_grad is not None else float("inf"))
        ok = torch.isfinite(window_sum)
        if not scaler.is_enabled():  # fp16: the scaler itself skips steps with inf gradients
            ok &= torch.isfinite(grad_norm)
        # One host sync per step, where all ranks agree on whether every window was finite
        # (gradients are synced, losses are not) and on the unreadable images met.
        ranks_ok, new_bad = all_reduce_sum(torch.stack(
            [ok.float(), torch.full((), float(bad_window), device=device)])).tolist()
        bad_window = 0
        bad_images.count(state, int(new_bad))
        if ranks_ok < info.world_size:
            _skip_step(optimizer, scaler, state, sampler, accum, r.max_nonfinite)
            continue
        state.nonfinite_in_row = 0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        logged_sum += window_sum
        logged_steps += 1
        end_of_epoch = state.batch_in_epoch == steps_per_epoch * accum
        stopping = r.max_steps is not None and state.step >= r.max_steps
        if state.step % r.log_every == 0 or end_of_epoch or stopping:
            loss_value = all_reduce_mean(logged_sum).item() / (logged_steps * accum)
            epoch_sum += loss_value * logged_steps
            epoch_steps += logged_steps
            now = time.perf_counter()
            ips = images_since / max(now - t_last, 1e-9)
            t_last, images_since = now, 0
            lr_now = optimizer.param_groups[0]["lr"]
            writer.write(state.step, dict(epoch=state.epoch, loss=loss_value, lr=lr_now,
                                          images_per_s=round(ips, 2)))
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", img_s=f"{ips:.1f}")
            if not (r.progress and info.is_main):
                log.info(f"epoch {state.epoch} step {state.step} loss {loss_value:.4f} "
                         f"lr {lr_now:.2e} {ips:.1f} img/s")
            logged_sum.zero_()
            logged_steps = 0
        if on_step is not None:
            on_step()
        if stopping:
            break
    bar.close()
    return epoch_sum / epoch_steps if epoch_steps else None


def _skip_step(optimizer, scaler, state: TrainState, sampler: BlockShardSampler, accum: int,
               max_nonfinite: int) -> None:
    """Drop the gradients of a window with a non-finite loss or gradient, log it, and stop after
    ``max_nonfinite`` such windows in a row."""
    optimizer.zero_grad(set_to_none=True)
    scaler.update()  # fp16: unscale_ ran, so the scaler must close the step (and back off)
    state.nonfinite_in_row += 1
    first = state.batch_in_epoch - accum
    indices = [i for b in range(first, state.batch_in_epoch) for i in sampler.batch_indices(b)]
    log.warning(f"non-finite loss or gradient before step {state.step} (epoch {state.epoch}, "
                f"batches {first}..{state.batch_in_epoch - 1}, dataset indices {indices}); "
                f"step skipped, weights untouched ({state.nonfinite_in_row} in a row)")
    if state.nonfinite_in_row >= max_nonfinite:
        raise FloatingPointError(
            f"{state.nonfinite_in_row} non-finite losses in a row (run.max_nonfinite="
            f"{max_nonfinite}); stopping. The last good checkpoint is untouched; try a lower "
            "optim.blr, a smaller optim.clip_grad or run.amp=off")


@dataclass
class RunContext:
    device: torch.device
    info: DistInfo
    amp_dtype: Optional[torch.dtype]
    output_dir: Path


@dataclass
class Job:
    """What a task brings to :func:`fit`."""

    title: str  # for the log, e.g. "STAR pretraining"
    model: torch.nn.Module  # trained, saved and resumed
    model_cfg: StarConfig
    dataset: Any  # the training set
    loss_fn: Callable  # (model, images, targets) -> loss
    describe: str = ""  # one line for the log
    extras: dict[str, Any] = field(default_factory=dict)  # more state_dict()-able things to save
    after_step: Optional[Callable[[], None]] = None  # e.g. an EMA update
    evaluate: Optional[Callable[[int], dict[str, float]]] = None  # epoch -> metrics incl. "score"
    # model -> numbers for metrics.jsonl's "diag" (None: nothing to log), every run.diag_every
    # steps, on rank 0 only (so it must not use collectives); it logs its own summary
    diagnose: Optional[Callable[[torch.nn.Module], Optional[dict[str, Any]]]] = None


def start_run(cfg: RunConfig, record: bool = True) -> RunContext:
    """Devices, process group, threads, output directory, resolved config and logging.

    ``record=False`` (evaluation): nothing is written; the log goes to stdout only."""
    r = cfg.run
    device = resolve_device(r.device, env_local_rank(), torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to it
    info = init_distributed(device)
    if r.threads:
        torch.set_num_threads(r.threads)
    amp_dtype = autocast_dtype(r.amp, device)
    output_dir = Path(r.output_dir)
    if info.is_main and record:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    barrier()
    setup_logging(output_dir if record else None, info.is_main)
    return RunContext(device, info, amp_dtype, output_dir)


def maybe_compile(model: torch.nn.Module, run: RunOptions) -> torch.nn.Module:
    """``torch.compile(model)`` if ``run.compile``. The compiled wrapper shares ``model``'s
    parameters; state dicts are read from ``model`` itself (no ``_orig_mod.`` prefixes)."""
    return torch.compile(model, mode=run.compile_mode) if run.compile else model


def wrap_for_training(model: torch.nn.Module, run: RunOptions, device: torch.device,
                      info: DistInfo) -> torch.nn.Module:
    """``model`` (already on ``device``), compiled if asked, then in DDP when there are several
    processes and something to train."""
    model = maybe_compile(model, run)
    if not (info.enabled and any(p.requires_grad for p in model.parameters())):
        return model
    # The models' buffers are constants (position tables, masks, loss weights; no running
    # statistics), so they need no broadcast before each forward. Every parameter gets a
    # gradient, so no search for unused ones either.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class TrainingItems(NamedTuple):
    """What the training loader reads (:func:`training_items`)."""

    dataset: Dataset  # items ((images, labels), unreadable-image reports) keyed (epoch, index)
    batch_size: int  # items per process and micro-batch
    collate: Callable  # items -> ((images (B, C, H, W), labels (B,)), reports)
    shuffle: bool  # whether the sampler shuffles the items per epoch
    num_images: int  # images per epoch, for the unreadable-image limit
    what: str  # for the log


def training_items(dataset: Dataset, batch_size: int, seed: int, world_size: int) -> TrainingItems:
    """How ``dataset`` is read in training; ``optim.batch_size`` (``batch_size``) counts images
    per process and micro-batch either way.

    A dataset of images is read image by image (:class:`SeededDataset`; pretraining packs K
    consecutive images of the shuffled data into a sequence). A :class:`SequenceDataset` is read
    sequence by sequence, ``batch_size // K`` per micro-batch (:class:`ReportedSequences`): the
    sampler shards whole sequences, so a sequence is never split across ranks."""
    if not isinstance(dataset, SequenceDataset):
        return TrainingItems(SeededDataset(dataset, seed), batch_size, collate_reported, True,
                             len(dataset), f"{len(dataset)} images")
    k = dataset.images_per_sequence
    if batch_size % k:
        raise ValueError(f"invalid config: optim.batch_size={batch_size} must be a multiple of "
                         f"the {k} images of a sequence")
    if len(dataset) < world_size * (batch_size // k):
        raise ValueError(f"{len(dataset)} {dataset.kind} sequences are fewer than one global batch "
                         f"({world_size} process(es) x optim.batch_size={batch_size} images = "
                         f"{world_size * (batch_size // k)} sequences of {k})")
    return TrainingItems(ReportedSequences(dataset), batch_size // k, collate_sequences_reported,
                         not dataset.shuffled_per_epoch, len(dataset) * k,
                         f"{len(dataset) * k} images ({len(dataset)} {dataset.kind} sequences of {k})")


def training_loader(dataset: Any, cfg: RunConfig, info: DistInfo, device: torch.device
                    ) -> tuple[Any, int, str]:
    """(loader, images per epoch, what for the log). The loader yields ``((images, targets),
    reports)`` and its ``sampler`` places each batch (``set_epoch``, ``global_block``, ...):
    a :class:`EpochIndexSampler` over a map-style dataset, or, for shards
    (:class:`~star_mamba.data.shards.ShardSet`), the stream's own plan, which gives every rank
    the same number of batches."""
    o, r, workers = cfg.optim, cfg.run, cfg.data.num_workers
    if isinstance(dataset, ShardSet):
        loader = dataset.train_loader(o.batch_size, info.rank, info.world_size, workers, r.seed,
                                      pin_memory=device.type == "cuda")
        return loader, len(dataset), (f"{len(dataset)} images in {len(dataset.index.shards)} "
                                      f"shards (streamed, buffer {dataset.shuffle_buffer})")
    items = training_items(dataset, o.batch_size, r.seed, info.world_size)
    sampler = EpochIndexSampler(len(items.dataset), items.batch_size, info.rank, info.world_size,
                                r.seed, shuffle=items.shuffle)
    loader = DataLoader(items.dataset, batch_size=items.batch_size,
                        sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        collate_fn=items.collate,  # (images, targets), unreadable-image reports
                        drop_last=True, persistent_workers=workers > 0,
                        # the workers' base seed comes from here, not from the global RNG
                        generator=torch.Generator().manual_seed(r.seed))
    return loader, items.num_images, items.what


def fit(cfg: RunConfig, ctx: RunContext, job: Job) -> dict[str, Any]:
    """Train ``job`` for ``optim.epochs`` epochs (or ``run.max_steps``), resuming if asked."""
    r, o = cfg.run, cfg.optim
    device, info, amp_dtype, output_dir = ctx.device, ctx.info, ctx.amp_dtype, ctx.output_dir
    model = job.model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    eff_batch = o.batch_size * o.accum_iter * info.world_size
    base_lr = o.lr if o.lr is not None else o.blr * eff_batch / 256
    optimizer = create_optimizer_v2(model, "adamw", lr=base_lr, weight_decay=o.weight_decay,
                                    betas=tuple(o.betas),
                                    layer_decay=o.layer_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = TrainState()
    best: dict[str, Any] = {"score": None}

    resume = ckpt.load_resume(output_dir, r.resume)
    resume_path = resume[0] if resume is not None else None
    if resume is not None:
        saved = resume[1]
        ckpt.check_same_model(saved["model_config"], job.model_cfg.to_dict(), resume_path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        for name, obj in job.extras.items():
            obj.load_state_dict(saved["extras"][name])
        state = TrainState(**saved["state"])
        best = saved.get("best", best)
        if "rng" in saved:  # training reseeds per micro-batch; this covers any other draw
            set_rng_state(saved["rng"])
        log.info(f"resumed from {resume_path} at epoch {state.epoch}, step {state.step}")

    trained = wrap_for_training(model, cfg.run, device, info)
    loader, num_images, what = training_loader(job.dataset, cfg, info, device)
    sampler = loader.sampler
    steps_per_epoch = sampler.batches_per_epoch // o.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"an epoch of {sampler.batches_per_epoch} batches is shorter than "
                         f"optim.accum_iter={o.accum_iter}")
    log.info(f"{job.title}: {cfg.model.name} ({n_params / 1e6:.2f}M params, "
             f"{n_train / 1e6:.2f}M trained){job.describe}, {what}, "
             f"{info.world_size} process(es) on {device}, effective batch {eff_batch}, "
             f"lr {base_lr:.3e}, {steps_per_epoch} steps/epoch, amp {amp_dtype}"
             f"{', torch.compile' if r.compile else ''}")

    writer = MetricWriter(output_dir, enabled=info.is_main, tensorboard=r.tensorboard)
    if resume_path is not None:
        writer.drop_after(state.step)  # rows of steps the resumed run redoes
    bad_images = BadImages(cfg.data.max_bad_fraction, num_images)

    def save(names: list[str]) -> None:
        if not info.is_main:
            return
        payload = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                       scaler=scaler.state_dict(), state=asdict(state), best=best, rng=rng_state(),
                       extras={n: obj.state_dict() for n, obj in job.extras.items()},
                       model_config=job.model_cfg.to_dict(), run_config=cfg.to_dict())
        for name in names:
            ckpt.atomic_save(payload, output_dir / name)
        ckpt.prune_numbered(output_dir, r.keep_last)

    def on_step() -> None:
        if job.after_step is not None:
            job.after_step()
        if job.diagnose is not None and r.diag_every and state.step % r.diag_every == 0:
            diagnose()
        if state.step % r.save_every_steps == 0:
            save([ckpt.LATEST])
        _maybe_inject_fault(state.step, info)

    def diagnose() -> None:
        """Rank 0 only: the others go on to the next step's all-reduce and wait for it there."""
        if not info.is_main:
            return
        values = job.diagnose(model)
        if values is not None:
            writer.write(state.step, dict(epoch=state.epoch, diag=values))

    epoch_loss = None
    start = time.perf_counter()
    try:
        while state.epoch < o.epochs and (r.max_steps is None or state.step < r.max_steps):
            sampler.set_epoch(state.epoch, state.batch_in_epoch)
            epoch_loss = train_one_epoch(trained, loader, optimizer, scaler, state, cfg, device,
                                         amp_dtype, base_lr, steps_per_epoch, writer, info,
                                         job.loss_fn, on_step, bad_images)
            if state.batch_in_epoch < steps_per_epoch * o.accum_iter:  # stopped by max_steps
                save([ckpt.LATEST])
                continue
            log.info(f"epoch {state.epoch} done: mean loss {epoch_loss:.4f}, step {state.step}")
            state.epoch += 1
            state.batch_in_epoch = state.bad_in_epoch = 0
            names = [ckpt.LATEST]
            if state.epoch % r.save_every == 0 or state.epoch == o.epochs:
                names.append(f"checkpoint-{state.epoch:04d}.pth")
            if job.evaluate is not None and (state.epoch % r.eval_every == 0 or state.epoch == o.epochs):
                metrics = job.evaluate(state.epoch)
                writer.write(state.step, dict(epoch=state.epoch, **metrics))
                log.info(f"epoch {state.epoch} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if best["score"] is None or metrics["score"] > best["score"]:
                    best = dict(score=metrics["score"], epoch=state.epoch)
                    names.append(ckpt.BEST)
            save(names)
        barrier()
    finally:
        writer.close()
    elapsed = time.perf_counter() - start
    if info.is_main and writer.path.exists():
        plot_loss_curve(writer.path, output_dir / "loss_curve.png",
                        f"{job.title}, {cfg.model.name} on {cfg.data.name}")
        log.info(f"finished: step {state.step}, {elapsed:.0f}s; outputs in {output_dir}")
    cleanup()
    return dict(step=state.step, epoch=state.epoch, loss=epoch_loss, seconds=elapsed,
                best=best, output_dir=str(output_dir))


def _maybe_inject_fault(step: int, info: DistInfo) -> None:
    """Fault injection for the tests: ``STAR_MAMBA_KILL_AT_STEP=N[:RANK]`` SIGKILLs that rank
    (default the last) after step N, in the first attempt of a torchrun job only."""
    spec = os.environ.get("STAR_MAMBA_KILL_AT_STEP")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    at, _, rank = spec.partition(":")
    if step == int(at) and info.rank == (int(rank) if rank else info.world_size - 1):
        os.kill(os.getpid(), signal.SIGKILL)
