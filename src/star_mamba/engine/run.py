"""Where a run runs: device, process group, threads, autocast, output directory (locked, tidied:
``outdir.py``), logging, and the model wrapped for training (``torch.compile``, DDP)."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError, UserError, writing
from .config import RunConfig, RunOptions, save_config
from .dist import DistInfo, any_rank, env_local_rank, init_distributed, resolve_device
from .outdir import RunLock, move_aside, remove_stray_tmp, starts_fresh

log = logging.getLogger("star_mamba")


@dataclass
class RunContext:
    """What :func:`start_run` set up; ``with start_run(cfg) as ctx:`` releases the output
    folder's lock at the end (:meth:`close`), however the run ends."""

    device: torch.device
    info: DistInfo
    amp_dtype: Optional[torch.dtype]
    output_dir: Path
    lock: Optional[RunLock] = field(default=None, repr=False)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "RunContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype ``run.amp`` asks for on ``device`` (None: full precision)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    choices = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ConfigError(f"invalid config: run.amp={amp!r}; allowed: 'auto', 'off', 'bf16', 'fp16'")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("invalid config: run.amp='fp16' needs a CUDA device; use 'bf16' or "
                          "'off' on CPU")
    return choices[amp]


def start_run(cfg: RunConfig, record: bool = True, trains: bool = False) -> RunContext:
    """Devices, process group, threads, output directory, resolved config and logging.

    With ``record`` rank 0 creates the output directory and holds its lock (``outdir.py``) until
    the context is closed, removes stray ``*.tmp`` files and, for a training run (``trains``)
    that starts from scratch, moves an earlier run's metrics and log aside. A folder that cannot
    be written or is in use stops every rank here with one line naming it.
    ``record=False`` (evaluation): nothing is written; the log goes to stdout only. The resolved
    config is written by :func:`record_config` once the run is known to go ahead (a refused
    resume leaves the folder's ``config.yaml`` describing its checkpoints)."""
    r = cfg.run
    device = resolve_device(r.device, env_local_rank(), torch.cuda.device_count())
    amp_dtype = autocast_dtype(r.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to it
    info = init_distributed(device)
    if r.threads:
        torch.set_num_threads(r.threads)
    output_dir = Path(r.output_dir)
    lock = RunLock(output_dir) if info.is_main and record else None
    failed: Optional[UserError] = None
    notes: list[str] = []
    if lock is not None:
        try:
            notes = open_output_dir(output_dir, lock, r.resume if trains else None)
            with writing(output_dir / "log.txt", "the log"):
                setup_logging(output_dir, True)
        except UserError as e:
            lock.release()
            failed = e
        except BaseException:
            lock.release()
            raise
    else:
        setup_logging(output_dir if record else None, info.is_main)
    if any_rank(failed is not None, device):  # every rank stops, none waits for rank 0
        raise failed or UserError(f"rank 0 could not open run.output_dir {output_dir} (its "
                                  "error says why)")
    for note in notes:
        log.info(note)
    return RunContext(device, info, amp_dtype, output_dir, lock)


def open_output_dir(output_dir: Path, lock: RunLock, resume: Optional[str]) -> list[str]:
    """Create ``output_dir``, take its lock and tidy it (``outdir.py``; ``resume``: the
    training run's ``run.resume``, None for other runs); lines for the log."""
    with writing(output_dir, "run.output_dir"):
        output_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        notes = []
        if stray := remove_stray_tmp(output_dir):
            notes.append(f"removed {len(stray)} temporary file(s) of an interrupted save in "
                         f"{output_dir}: {', '.join(stray)}")
        if resume is not None and starts_fresh(output_dir, resume) and (
                moved := move_aside(output_dir)):
            notes.append(f"starting from scratch in {output_dir}: the earlier run's files "
                         f"moved aside as {', '.join(moved)}")
        return notes


def record_config(cfg: RunConfig, ctx: RunContext) -> None:
    """Write the resolved config to ``config.yaml`` in the run directory (rank 0)."""
    if ctx.info.is_main:
        with writing(ctx.output_dir / "config.yaml", "the run config"):
            save_config(cfg, ctx.output_dir / "config.yaml")


def compiles(run: RunOptions, device: torch.device, auto: bool = True) -> bool:
    """Whether ``run.compile`` compiles here. ``true``/``false`` as given; ``auto``: on CUDA, where
    compiling paid 2.25x at 64 images on the H200 (an eager step there waits on the host), off
    on the CPU, where eager is as fast for these small graphs and compiling costs minutes of
    start-up. ``auto=False``: a task whose models stay eager under ``auto`` (the dense tasks:
    torchvision's detection heads have data-dependent shapes, and segmentation evaluates at
    many image sizes, so both would recompile)."""
    if run.compile == "auto":
        return auto and device.type == "cuda"
    return bool(run.compile)


def maybe_compile(model: torch.nn.Module, run: RunOptions, device: torch.device,
                  auto: bool = True) -> torch.nn.Module:
    """``torch.compile(model)`` where :func:`compiles`. The compiled wrapper shares ``model``'s
    parameters; state dicts are read from ``model`` itself (no ``_orig_mod.`` prefixes)."""
    return torch.compile(model, mode=run.compile_mode) if compiles(run, device, auto) else model


def wrap_for_training(model: torch.nn.Module, run: RunOptions, device: torch.device,
                      info: DistInfo, ddp: bool = True, auto_compile: bool = True
                      ) -> torch.nn.Module:
    """``model`` (already on ``device``), compiled if asked, then in DDP when there are several
    processes and something to train (``ddp=False``: a model FSDP has sharded already)."""
    model = maybe_compile(model, run, device, auto_compile)
    if not (ddp and info.enabled and any(p.requires_grad for p in model.parameters())):
        return model
    # The models' buffers are constants (position tables, masks, loss weights; no running
    # statistics), so they need no broadcast before each forward. Every parameter gets a
    # gradient, so no search for unused ones either.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
