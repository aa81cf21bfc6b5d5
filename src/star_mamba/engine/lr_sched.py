"""Per-iteration learning-rate schedule: linear warm-up, then half-cycle cosine (MAE's, the
default) or polynomial decay (mmsegmentation's ``poly``, the dense recipes') to ``min_lr``."""
from __future__ import annotations

import math


SCHEDULES = ("cosine", "poly")


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float,
          schedule: str = "cosine", power: float = 1.0) -> float:
    """Learning rate at a fractional ``epoch`` (step / steps_per_epoch): linear warm-up over
    ``warmup_epochs``, then ``cosine`` (half a cycle) or ``poly`` ((1 - progress) ** power)
    from ``lr`` to ``min_lr`` at ``epochs``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    if schedule == "poly":
        return min_lr + (lr - min_lr) * (1.0 - progress) ** power
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
