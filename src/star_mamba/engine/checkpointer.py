"""What a training checkpoint holds and where it goes: the :class:`Checkpointer` of the
:class:`~.trainer.Trainer`, on the atomic writes of ``star_mamba/checkpoint.py``."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .. import checkpoint as ckpt


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


class Checkpointer:
    """Saves and finds the checkpoints of one run directory.

    ``save(payload, names)`` writes the payload atomically under each name (rank 0 only; the
    others return): once, the other names hard links to it (``atomic_save``), and keeps the
    ``keep_last`` newest numbered ones; :meth:`load` is the resume
    rule of :func:`star_mamba.checkpoint.load_resume` (``auto``: the newest that loads).
    """

    def __init__(self, output_dir: Path, keep_last: int, enabled: bool = True):
        self.output_dir, self.keep_last, self.enabled = Path(output_dir), keep_last, enabled

    def load(self, resume: str) -> Optional[tuple[Path, dict[str, Any]]]:
        return ckpt.load_resume(self.output_dir, resume)

    def save(self, payload: dict[str, Any], names: Sequence[str]) -> None:
        if not self.enabled:
            return
        if names:
            first, *others = names
            ckpt.atomic_save(payload, self.output_dir / first,
                             also=[self.output_dir / n for n in others])
        ckpt.prune_numbered(self.output_dir, self.keep_last)

    @staticmethod
    def numbered(epoch: int) -> str:
        return f"checkpoint-{epoch:04d}.pth"
