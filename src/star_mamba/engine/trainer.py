"""The Trainer: one training loop for every task (torchtitan's shape: state on the object).

A task (``star_mamba/tasks/``) says what to train as a :class:`TrainTask`: the model, the
training set, the loss, and optional extras (an EMA to keep in the checkpoint, an evaluation at
the end of an epoch, diagnostics every ``run.diag_every`` steps). :class:`Trainer` does the rest,
the same way from one CPU process to many GPU processes under ``torchrun``:

    Trainer(cfg, ctx, task)       optimizer, schedule, resume (the Checkpointer), loader
      .train()                    epochs until optim.epochs or run.max_steps -> summary
        .train_epoch()            micro-batches -> .step() every accum_iter of them
          .step()                 clip, one host sync (finite? unreadable images?), optimizer
          .after_step()           the task's after_step, diagnose, rolling save, step hooks
        .end_epoch()              evaluate, keep the best, numbered checkpoint
      .save(names)                model, optimizer, scaler, state, RNGs, extras, configs

Step hooks (``hooks=``, ``fn(trainer)`` after every optimizer step) let callers watch or
interrupt training without touching the step; the reliability tests' fault injection is one
(``faults.py``). Nothing non-finite is ever saved: a save checks the weights first. A run that
diverges names the checkpoint to go on from (:meth:`Trainer.resume_advice`); SIGINT/SIGTERM stop
it at a step boundary with the checkpoint saved (``signals.py``).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from timm.optim import create_optimizer_v2
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..config import StarConfig
from ..errors import ConfigError, DataError, DivergedError, Interrupted, UnreadableImagesError
from ..seeding import block_seed, seed_everything
from . import faults, fsdp
from .checkpointer import Checkpointer, rng_state, set_rng_state
from .config import RunConfig
from .dist import all_reduce_mean, all_reduce_sum, barrier, cleanup
from .loaders import training_loader
from .lr_sched import lr_at, set_lr
from .metrics import MetricWriter, plot_loss_curve
from .run import RunContext, compiles, record_config, wrap_for_training
from .sampler import BatchPlan
from .signals import StopSignals

log = logging.getLogger("star_mamba")


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    step: int = 0  # optimizer steps taken in total
    nonfinite_in_row: int = 0
    bad_in_epoch: int = 0  # unreadable images met in the current epoch, over all ranks


@dataclass
class TrainTask:
    """What a task brings to the :class:`Trainer`."""

    title: str  # for the log, e.g. "STAR pretraining"
    model: torch.nn.Module  # trained, saved and resumed
    model_cfg: StarConfig
    dataset: Any  # the training set
    loss_fn: Callable  # (model, images, targets) -> loss
    describe: str = ""  # one line for the log
    loss_name: str = "MSE on per-patch-normalised pixels"  # the loss curve's y axis
    extras: dict[str, Any] = field(default_factory=dict)  # more state_dict()-able things to save
    after_step: Optional[Callable[[], None]] = None  # e.g. an EMA update
    evaluate: Optional[Callable[[int], dict[str, float]]] = None  # epoch -> metrics incl. "score"
    # model -> numbers for metrics.jsonl's "diag" (None: nothing to log), every run.diag_every
    # steps, on rank 0 only (so it must not use collectives); it logs its own summary
    diagnose: Optional[Callable[[torch.nn.Module], Optional[dict[str, Any]]]] = None
    # samples -> (images, targets) for a batch, when default_collate's stacking does not fit
    # (detection: lists of images of several sizes and of target dicts)
    collate: Optional[Callable[[list], Any]] = None
    # whether run.parallel=fsdp may shard the model (its evaluation runs the model on every
    # rank, and no extra holds a copy of the weights)
    shardable: bool = True
    # whether run.compile=auto compiles the model on CUDA (engine/run.py compiles())
    compile_auto: bool = True


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch's tensors on ``device`` (non-blocking), through lists, tuples and dicts."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


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
            raise UnreadableImagesError(
                f"{state.bad_in_epoch} unreadable images in epoch {state.epoch + 1} (all ranks) of "
                f"{self.dataset_size}: more than data.max_bad_fraction={self.max_fraction}; "
                f"stopping before step {state.step + 1}, the last checkpoint is untouched. Last "
                f"one met here: {self.last or '(on another rank)'}")


class _Meter:
    """The losses and throughput between two log lines, and the epoch's mean loss."""

    def __init__(self, device: torch.device):
        self.logged_sum = torch.zeros((), device=device)  # window losses since the last line
        self.logged_steps, self.epoch_sum, self.epoch_steps = 0, 0.0, 0
        self.t_last, self.images = time.perf_counter(), 0

    def add_step(self, window_sum: torch.Tensor) -> None:
        self.logged_sum += window_sum
        self.logged_steps += 1

    def flush(self, accum: int) -> tuple[float, float]:
        """(mean loss per micro-batch since the last line, images/s), over all ranks."""
        loss = all_reduce_mean(self.logged_sum).item() / (self.logged_steps * accum)
        self.epoch_sum += loss * self.logged_steps
        self.epoch_steps += self.logged_steps
        now = time.perf_counter()
        ips = self.images / max(now - self.t_last, 1e-9)
        self.t_last, self.images = now, 0
        self.logged_sum.zero_()
        self.logged_steps = 0
        return loss, ips

    @property
    def epoch_loss(self) -> Optional[float]:
        return self.epoch_sum / self.epoch_steps if self.epoch_steps else None


class Trainer:
    """Trains a :class:`TrainTask` for ``optim.epochs`` epochs (or ``run.max_steps``), resuming
    from ``run.resume``; see the module docstring."""

    def __init__(self, cfg: RunConfig, ctx: RunContext, task: TrainTask,
                 hooks: Sequence[Callable[["Trainer"], None]] = ()):
        self.cfg, self.ctx, self.task = cfg, ctx, task
        o, r, info = cfg.optim, cfg.run, ctx.info
        self.model = task.model.to(ctx.device)
        if r.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.sharded = self.shard(task)
        self.global_batch = o.batch_size * o.accum_iter * info.world_size
        self.base_lr = o.base_lr(self.global_batch)
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=self.base_lr,
                                             weight_decay=o.weight_decay, betas=tuple(o.betas),
                                             layer_decay=o.layer_decay)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
        self.state = TrainState()
        self.best: dict[str, Any] = {"score": None}
        self.hooks = [*hooks, *faults.hooks_from_env()]
        self.signals = StopSignals()
        self.interrupted = False  # every rank has agreed to stop at this step (a signal)
        self.checkpointer = Checkpointer(ctx.output_dir, r.keep_last, info.is_main)
        resumed_from = self.resume()
        record_config(cfg, ctx)
        self.trained = wrap_for_training(self.model, r, ctx.device, info, ddp=not self.sharded,
                                         auto_compile=task.compile_auto)
        self.loader, num_images, what = training_loader(task.dataset, cfg, info, ctx.device,
                                                        task.collate)
        self.sampler: BatchPlan = self.loader.sampler
        self.steps_per_epoch = self.sampler.batches_per_epoch // o.accum_iter
        if self.steps_per_epoch == 0:
            raise DataError(f"an epoch of {self.sampler.batches_per_epoch} batches is shorter "
                            f"than optim.accum_iter={o.accum_iter}")
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info(f"{task.title}: {cfg.model.name} ({n_params / 1e6:.2f}M params, "
                 f"{n_train / 1e6:.2f}M trained){task.describe}, {what}, "
                 f"{info.world_size} process(es) on {ctx.device}, effective batch "
                 f"{self.global_batch}, lr {self.base_lr:.3e}, {self.steps_per_epoch} steps/epoch, "
                 f"amp {ctx.amp_dtype}"
                 f"{', torch.compile' if compiles(r, ctx.device, task.compile_auto) else ''}")
        self.writer = MetricWriter(ctx.output_dir, enabled=info.is_main, tensorboard=r.tensorboard)
        if resumed_from is not None:
            self.writer.drop_after(self.state.step)  # rows of steps the resumed run redoes
        self.bad_images = BadImages(cfg.data.max_bad_fraction, num_images)

    def shard(self, task: TrainTask) -> bool:
        """Under ``run.parallel: fsdp`` with several processes, shard the model in place
        (``fsdp.py``) before the optimizer is made over its shards; whether it was."""
        r, info = self.cfg.run, self.ctx.info
        if r.parallel != "fsdp":
            return False
        if not info.enabled:
            log.info("run.parallel=fsdp with one process: nothing to shard, trained as is")
            return False
        why = None
        if not task.shardable:
            why = "this task's evaluation runs its model on rank 0 alone"
        elif task.extras:
            why = (f"{', '.join(task.extras)} keeps a full copy of the weights (run.ema_decay=null "
                   "turns the EMA off)")
        elif self.ctx.amp_dtype == torch.float16:
            why = "fp16 needs a gradient scaler over the shards (run.amp=bf16 instead)"
        if why:
            raise ConfigError(f"invalid config: run.parallel=fsdp is not supported here: {why}; "
                              "or use run.parallel=ddp")
        param_dtype = self.ctx.amp_dtype if self.ctx.amp_dtype == torch.bfloat16 else None
        units = fsdp.shard_model(self.model, param_dtype)
        log.info(f"FSDP2: {units} blocks sharded over {info.world_size} processes, parameters gathered in "
                 f"{param_dtype or torch.float32}, gradients reduced in float32")
        return True

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds. Sharded (FSDP), the model and optimizer states are gathered
        to rank 0 in full, the optimizer's keyed by parameter name; collective then."""
        if self.sharded:
            model, optimizer = (fsdp.full_model_state(self.model),
                                fsdp.full_optimizer_state(self.model, self.optimizer))
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        return dict(model=model, optimizer=optimizer,
                    scaler=self.scaler.state_dict(), state=asdict(self.state), best=self.best,
                    rng=rng_state(),
                    extras={n: obj.state_dict() for n, obj in self.task.extras.items()},
                    model_config=self.task.model_cfg.to_dict(), run_config=self.cfg.to_dict())

    def load_state_dict(self, saved: dict[str, Any], path=None) -> None:
        if self.sharded or fsdp.keyed_by_name(saved["optimizer"]):  # into FSDP, or an FSDP run's
            fsdp.load_full_state(self.model, self.optimizer, saved["model"], saved["optimizer"],
                                 path)
        else:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        for name, obj in self.task.extras.items():
            obj.load_state_dict(saved["extras"][name])
        self.state = TrainState(**saved["state"])
        self.best = saved.get("best", self.best)
        if "rng" in saved:  # training reseeds per micro-batch; this covers any other draw
            set_rng_state(saved["rng"])

    def resume(self):
        """Load the checkpoint ``run.resume`` names (``auto``: the newest in the run directory);
        returns its path, or None for a fresh start. One made for another model is refused."""
        found = self.checkpointer.load(self.cfg.run.resume)
        if found is None:
            return None
        path, saved = found
        ckpt.check_same_model(saved["model_config"], self.task.model_cfg.to_dict(), path)
        self.load_state_dict(saved, path)
        st, epochs = self.state, self.cfg.optim.epochs
        log.info(f"resumed from {path} at step {st.step}, {st.batch_in_epoch} batches into epoch "
                 f"{st.epoch + 1}/{epochs}")
        return path

    def save(self, names: Sequence[str]) -> None:
        """Write a checkpoint under each of ``names`` (rank 0). Refused, with the last good
        checkpoint left as it is, when a weight is not finite."""
        if not (self.ctx.info.is_main or self.sharded):
            return
        payload = self.state_dict()  # sharded: every rank gathers, rank 0 receives
        if not self.ctx.info.is_main:
            return
        bad = [n for n, p in payload["model"].items()
               if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise DivergedError(
                f"non-finite weights at step {self.state.step} ({len(bad)} tensors, e.g. "
                f"{bad[0]}); not saved. {self.resume_advice()}")
        self.checkpointer.save(payload, names)

    def resume_advice(self) -> str:
        """After a divergence at ``state.step``: which checkpoint to go on from, in a sentence.

        A checkpoint saved at step s < ``state.step`` is known good: step s + 1 was taken, so
        its weights gave finite losses. One saved at ``state.step`` holds the weights the
        non-finite losses (or weights) came from, so resuming it with any lr would stop again;
        then an older numbered checkpoint is named, else starting over."""
        how = "a lower optim.blr, a smaller optim.clip_grad or run.amp=off"
        for path in ckpt.resume_candidates(self.ctx.output_dir):
            step = ckpt.saved_step(path)
            if step is not None and step < self.state.step:
                return (f"To go on with {how}, resume from {path} (step {step}, the newest "
                        f"checkpoint known to give finite losses): run.resume={path}")
        return (f"No checkpoint in {self.ctx.output_dir} is known to give finite losses (none "
                f"saved before step {self.state.step}): start over with {how} and "
                "run.resume=never")

    # ----------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        """Train until ``optim.epochs`` epochs (or ``run.max_steps`` steps) are done; returns a
        summary (``step``, ``epoch``, ``loss`` of the last epoch, ``seconds``, ``best``)."""
        o, r = self.cfg.optim, self.cfg.run
        epoch_loss = None
        if self.state.epoch >= o.epochs or self.stopping:
            return self.already_finished()
        start = time.perf_counter()
        try:
            with self.signals:
                while self.state.epoch < o.epochs and not self.stopping:
                    self.sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch)
                    epoch_loss = self.train_epoch()
                    if self.state.batch_in_epoch < self.steps_per_epoch * o.accum_iter:
                        self.save([ckpt.LATEST])  # stopped mid-epoch: max_steps or a signal
                        continue
                    self.end_epoch(epoch_loss)
                barrier()
        finally:
            self.writer.close()
        if self.interrupted:
            self.stop_interrupted()
        elapsed = time.perf_counter() - start
        if self.ctx.info.is_main and self.writer.path.exists():
            plot_loss_curve(self.writer.path, self.ctx.output_dir / "loss_curve.png",
                            f"{self.task.title}, {self.cfg.model.name} on {self.cfg.data.name}",
                            ylabel=f"training loss ({self.task.loss_name})")
            log.info(f"finished: step {self.state.step}, {elapsed:.0f}s; outputs in "
                     f"{self.ctx.output_dir}")
        cleanup()
        return dict(step=self.state.step, epoch=self.state.epoch, loss=epoch_loss,
                    seconds=elapsed, best=self.best, output_dir=str(self.ctx.output_dir))

    def already_finished(self) -> dict[str, Any]:
        """A resumed run that has nothing left to train: one line saying so and what to change;
        the summary, with nothing plotted or saved again."""
        o, r = self.cfg.optim, self.cfg.run
        limit = (f"optim.epochs={o.epochs}" if self.state.epoch >= o.epochs
                 else f"run.max_steps={r.max_steps}")
        log.info(f"{self.ctx.output_dir} already finished at step {self.state.step} ({limit}): "
                 "nothing to train; raise optim.epochs / run.max_steps to go on, or pick another "
                 "run.output_dir")
        self.writer.close()
        cleanup()
        return dict(step=self.state.step, epoch=self.state.epoch, loss=None, seconds=0.0,
                    best=self.best, output_dir=str(self.ctx.output_dir))

    @property
    def stopping(self) -> bool:
        """Whether ``run.max_steps`` steps are done, or a signal asked to stop."""
        return self.interrupted or (self.cfg.run.max_steps is not None
                                    and self.state.step >= self.cfg.run.max_steps)

    def stop_interrupted(self) -> None:
        """After the stop a signal asked for (the checkpoint is saved): one line, then
        :class:`Interrupted` on every rank."""
        signum = self.signals.received or signal.SIGTERM  # a rank told by the others: torchrun's
        message = (f"interrupted by {signal.Signals(signum).name} at step {self.state.step}: "
                   f"saved {self.ctx.output_dir / ckpt.LATEST}; run again to resume")
        log.info(message)
        cleanup()
        raise Interrupted(message, signum)

    def train_epoch(self) -> Optional[float]:
        """One pass over the loader from ``state.batch_in_epoch``; the epoch's mean loss.

        The random draws of each micro-batch (drop path, mixup) are seeded from its global
        block (``sampler.py``). The host waits for the device once per optimizer step (in
        :meth:`step`) and for the loss only on logging steps.
        """
        o, r, info, state = self.cfg.optim, self.cfg.run, self.ctx.info, self.state
        accum, device = o.accum_iter, self.ctx.device
        self.trained.train()
        meter = _Meter(device)
        window_sum = torch.zeros((), device=device)  # losses of the current accumulation window
        bad_window = 0  # unreadable images in the micro-batches since the last step
        bar = tqdm(total=self.steps_per_epoch * accum, initial=state.batch_in_epoch, leave=False,
                   disable=not (r.progress and info.is_main),
                   desc=f"epoch {state.epoch + 1}/{o.epochs}",
                   dynamic_ncols=True, file=sys.stdout)
        for (images, targets), bad in self.loader:
            bad_window += self.bad_images.note(bad)
            micro = state.batch_in_epoch % accum
            if micro == 0:
                set_lr(self.optimizer, lr_at(
                    state.epoch + state.batch_in_epoch / (self.steps_per_epoch * accum),
                    self.base_lr, o.min_lr, o.warmup_epochs, o.epochs, o.schedule, o.poly_power))
            loss = self.forward_backward(images, targets, last=micro == accum - 1)
            # NaN and inf survive summation, so the window's sum is finite iff every loss was.
            window_sum = loss if micro == 0 else window_sum + loss
            state.batch_in_epoch += 1
            meter.images += len(images) * info.world_size
            bar.update(1)
            if micro != accum - 1:
                continue
            if self.step(window_sum, bad_window):
                meter.add_step(window_sum)
                end_of_epoch = state.batch_in_epoch == self.steps_per_epoch * accum
                if state.step % r.log_every == 0 or end_of_epoch or self.stopping:
                    self.log_step(meter, bar)
                self.after_step()
            bad_window = 0
            if self.stopping:
                break
        bar.close()
        return meter.epoch_loss

    def forward_backward(self, images: torch.Tensor, targets: torch.Tensor,
                         last: bool) -> torch.Tensor:
        """One micro-batch through the loss and backward (gradients summed over the window,
        synchronised across ranks on its ``last`` micro-batch only); its detached loss."""
        state, device, amp_dtype = self.state, self.ctx.device, self.ctx.amp_dtype
        seed_everything(block_seed(self.cfg.run.seed, state.epoch,
                                   self.sampler.global_block(state.batch_in_epoch)))
        images, targets = to_device(images, device), to_device(targets, device)
        if self.sharded:  # FSDP2 reduce-scatters on the window's last backward only
            self.model.set_requires_gradient_sync(last)
        sync = (self.trained.no_sync() if (self.ctx.info.enabled and not last
                                           and not self.sharded)
                else contextlib.nullcontext())
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss = self.task.loss_fn(self.trained, images, targets)
            # Backward even when the loss is not finite: whether it is is only read once per
            # step, and the step is then skipped with the weights untouched.
            self.scaler.scale(loss / self.cfg.optim.accum_iter).backward()
        return loss.detach().float()

    def step(self, window_sum: torch.Tensor, bad_window: int) -> bool:
        """The optimizer step closing an accumulation window, or its skip when a loss or the
        gradient is not finite on any rank; True when it was taken."""
        o = self.cfg.optim
        self.scaler.unscale_(self.optimizer)
        grad_norm = fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(
            self.trained.parameters(), o.clip_grad if o.clip_grad is not None else float("inf")))
        ok = torch.isfinite(window_sum)
        if not self.scaler.is_enabled():  # fp16: the scaler itself skips steps with inf gradients
            ok &= torch.isfinite(grad_norm)
        # One host sync per step, where all ranks agree on whether every window was finite
        # (gradients are synced, losses are not), on the unreadable images met and on whether
        # a signal asks to stop after this step.
        device = self.ctx.device
        ranks_ok, new_bad, signalled = all_reduce_sum(torch.stack(
            [ok.float(), torch.full((), float(bad_window), device=device),
             torch.full((), float(self.signals.received is not None), device=device)])).tolist()
        self.interrupted = signalled > 0
        self.bad_images.count(self.state, int(new_bad))
        if ranks_ok < self.ctx.info.world_size:
            self.skip_step()
            return False
        self.state.nonfinite_in_row = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return True

    def skip_step(self) -> None:
        """Drop the gradients of a window with a non-finite loss or gradient, log it, and stop
        after ``run.max_nonfinite`` such windows in a row."""
        state, accum = self.state, self.cfg.optim.accum_iter
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()  # fp16: unscale_ ran, so the scaler must close the step (and back off)
        state.nonfinite_in_row += 1
        first = state.batch_in_epoch - accum
        indices = [i for b in range(first, state.batch_in_epoch)
                   for i in self.sampler.batch_indices(b)]
        log.warning(f"non-finite loss or gradient before step {state.step} (epoch {state.epoch + 1}, "
                    f"batches {first}..{state.batch_in_epoch - 1}, dataset indices {indices}); "
                    f"step skipped, weights untouched ({state.nonfinite_in_row} in a row)")
        if state.nonfinite_in_row >= self.cfg.run.max_nonfinite:
            raise DivergedError(
                f"{state.nonfinite_in_row} non-finite losses in a row (run.max_nonfinite="
                f"{self.cfg.run.max_nonfinite}) after step {state.step}; stopping. "
                f"{self.resume_advice()}")

    def log_step(self, meter: _Meter, bar) -> None:
        """One logged step: metrics.jsonl, the progress bar, or a log line without it. ``lr`` is
        the largest parameter group's: with layer-wise decay (``optim.layer_decay``) the head's,
        the schedule's own lr; the groups of earlier layers run at a fraction of it."""
        loss, ips = meter.flush(self.cfg.optim.accum_iter)
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        self.writer.write(self.state.step, dict(epoch=self.state.epoch, loss=loss, lr=lr,
                                                images_per_s=round(ips, 2)))
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
        if not (self.cfg.run.progress and self.ctx.info.is_main):
            log.info(f"epoch {self.state.epoch + 1}/{self.cfg.optim.epochs} step "
                     f"{self.state.step} loss {loss:.4f} "
                     f"lr {lr:.2e} {ips:.1f} img/s")

    def after_step(self) -> None:
        """After every optimizer step: the task's ``after_step`` (an EMA), the diagnostics every
        ``run.diag_every`` steps, the rolling checkpoint every ``run.save_every_steps``, then
        the step hooks."""
        r = self.cfg.run
        if self.task.after_step is not None:
            self.task.after_step()
        if self.task.diagnose is not None and r.diag_every and self.state.step % r.diag_every == 0:
            self.diagnose()
        if self.state.step % r.save_every_steps == 0:
            self.save([ckpt.LATEST])
        for hook in self.hooks:
            hook(self)

    def diagnose(self) -> None:
        """Rank 0 only: the others go on to the next step's all-reduce and wait for it there.
        Sharded, every rank runs the model (its forward gathers the blocks); rank 0 writes."""
        if not (self.ctx.info.is_main or self.sharded):
            return
        values = self.task.diagnose(self.model)
        if values is not None and self.ctx.info.is_main:
            self.writer.write(self.state.step, dict(epoch=self.state.epoch, diag=values))

    def end_epoch(self, epoch_loss: Optional[float]) -> None:
        """Close a finished epoch: log, evaluate (every ``run.eval_every`` epochs and at the
        end), keep the best, and save the rolling, numbered and best checkpoints."""
        o, r, state = self.cfg.optim, self.cfg.run, self.state
        log.info(f"epoch {state.epoch + 1}/{o.epochs} done: mean loss {epoch_loss:.4f}, "
                 f"step {state.step}")
        state.epoch += 1
        state.batch_in_epoch = state.bad_in_epoch = 0
        names = [ckpt.LATEST]
        if state.epoch % r.save_every == 0 or state.epoch == o.epochs:
            names.append(Checkpointer.numbered(state.epoch))
        if self.task.evaluate is not None and (state.epoch % r.eval_every == 0
                                               or state.epoch == o.epochs):
            metrics = self.task.evaluate(state.epoch)
            self.writer.write(state.step, dict(epoch=state.epoch, **metrics))
            log.info(f"epoch {state.epoch}/{o.epochs} eval: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if self.best["score"] is None or metrics["score"] > self.best["score"]:
                self.best = dict(score=metrics["score"], epoch=state.epoch)
                names.append(ckpt.BEST)
        self.save(names)


__all__ = ["BadImages", "Trainer", "TrainState", "TrainTask"]
