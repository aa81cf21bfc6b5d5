"""The tasks: each says how to build its model, data, loss and evaluation, and runs them
(training through :class:`~star_mamba.engine.trainer.Trainer`).

``pretrain`` (``star-mamba pretrain``), ``finetune`` (``star-mamba finetune``; ``eval`` is its
``evaluate_checkpoint``), ``linprobe`` (``star-mamba linprobe``, the converged probe of a
frozen backbone), ``segment`` (``star-mamba segment``, semantic segmentation) and ``detect``
(``star-mamba detect``, Mask R-CNN); ``eval`` of their checkpoints is their
``evaluate_*_checkpoint``. Each takes a :class:`~star_mamba.engine.config.RunConfig` of its task.
"""
from __future__ import annotations

from typing import Any, Callable

from ..engine.config import RunConfig


def run_task(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg.task`` (pretrain, finetune, linprobe, segment or detect) with ``cfg``; its summary."""
    return TASKS[cfg.task]()(cfg)


def _pretrain() -> Callable:
    from .pretrain import pretrain
    return pretrain


def _finetune() -> Callable:
    from .finetune import finetune
    return finetune


def _linprobe() -> Callable:
    from .linprobe import linprobe
    return linprobe


def _segment() -> Callable:
    from .segment import segment
    return segment


def _detect() -> Callable:
    from .detect import detect
    return detect


TASKS: dict[str, Callable[[], Callable[[RunConfig], dict[str, Any]]]] = {
    "pretrain": _pretrain, "finetune": _finetune, "linprobe": _linprobe,
    "segment": _segment, "detect": _detect}
