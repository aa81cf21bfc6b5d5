"""What the dense tasks (``segment``, ``detect``) share: loading the backbone they start from,
and telling which task wrote a checkpoint (so ``star-mamba eval`` scores it the right way)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..checkpoint import load_checkpoint
from ..models.convert import load_pretrained

log = logging.getLogger("star_mamba")

DEFAULT_PRETRAINED = "runs/pretrain_fashion_mnist/checkpoint-latest.pth"
"""The default configs' backbone (the default pretraining run): may be missing, then a warning."""


def load_backbone(backbone: nn.Module, source: Optional[str], what: str) -> None:
    """Load ``source`` (``run.pretrained``: a STAR pretraining checkpoint or a classifier) into
    ``backbone`` (a ``StarClassifier``). The default checkpoint missing is a warning and random
    weights (``what`` the task, for it); any other missing path is the loader's error."""
    if not source:
        return
    if source == DEFAULT_PRETRAINED and not Path(source).exists():
        log.warning(f"{source} does not exist (run `star-mamba pretrain` first): the backbone "
                    f"starts from random weights, which {what} far worse")
        return
    report = load_pretrained(backbone, source)
    log.info(f"loaded {source} into the backbone: {report.summary()}")


def saved_task(saved: Any) -> Optional[str]:
    """The task of the run that wrote a loaded checkpoint (None: none recorded)."""
    return (saved.get("run_config") or {}).get("task") if isinstance(saved, dict) else None


def checkpoint_task(checkpoint: str | Path) -> Optional[str]:
    """:func:`saved_task` of a checkpoint file or run directory (None for anything unreadable:
    whichever loader reads it next says what is wrong with it)."""
    try:
        return saved_task(load_checkpoint(Path(checkpoint)))
    except Exception:  # noqa: BLE001 - reported by the loader that reads it next
        return None
