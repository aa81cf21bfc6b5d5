"""Fault injection for the reliability tests, as a :class:`~.trainer.Trainer` step hook.

``STAR_MAMBA_KILL_AT_STEP=N[:RANK]`` in the environment makes :func:`hooks_from_env` return a
hook that SIGKILLs that rank (default: the last) right after optimizer step N, in the first
attempt of a torchrun job only (a restarted job runs on). Without the variable there is no hook
and the training step carries no trace of this.
"""
from __future__ import annotations

import os
import signal
from typing import Callable


def hooks_from_env() -> list[Callable]:
    spec = os.environ.get("STAR_MAMBA_KILL_AT_STEP")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return []
    at, _, rank = spec.partition(":")

    def kill_at_step(trainer) -> None:
        info = trainer.ctx.info
        if trainer.state.step == int(at) and info.rank == (int(rank) if rank else info.world_size - 1):
            os.kill(os.getpid(), signal.SIGKILL)
    return [kill_at_step]
