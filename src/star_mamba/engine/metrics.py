"""Metrics: JSON lines (always), TensorBoard (when installed) and a loss-curve plot."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import writing

log = logging.getLogger("star_mamba")


class MetricWriter:
    """Rank 0 appends one JSON object per logged step to ``metrics.jsonl`` (and TensorBoard).

    The trainer's rows: ``step``, ``epoch``, ``loss``, ``lr``, ``images_per_s`` per logged step,
    where ``epoch`` is the 0-based index of the epoch the step belongs to and ``lr`` the largest
    parameter group's (the head's with ``optim.layer_decay``: the schedule's lr itself); an
    evaluation row (``top1``, ``score`` ...) after an epoch, whose ``epoch`` is the number of
    epochs done (1 after the first; the log's "epoch 1/E eval"); ``diag`` rows in pretraining.

    Numbers become TensorBoard scalars under their key; a dict of numbers (the pretraining
    diagnostics' ``diag``) one scalar per entry, tagged ``key/entry``. None is skipped there."""

    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with writing(self.path, "metrics"), open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, dict):
                    for name, v in value.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            self.tb.add_scalar(f"{key}/{name}", v, step)
                elif isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, step)

    def drop_after(self, step: int) -> None:
        """Remove the rows of steps after ``step`` (a resumed run redoes them and writes them
        again) and any row cut short by a crash; the file is replaced atomically."""
        if not (self.enabled and self.path.is_file()):
            return

        def row_step(row: str) -> Optional[int]:
            try:
                return json.loads(row)["step"] if row.endswith("\n") else None
            except (ValueError, KeyError, TypeError):
                return None

        rows = self.path.read_text().splitlines(keepends=True)
        keep = [row for row in rows if (s := row_step(row)) is not None and s <= step]
        if len(keep) < len(rows):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, self.path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(metrics_path: Path, out_path: Path, title: Optional[str] = None,
                    ylabel: str = "training loss (MSE on per-patch-normalised pixels)") -> Path:
    """Plot ``loss`` against ``step`` from a metrics file into a PNG; ``ylabel`` names the
    loss (the trainer passes its task's ``loss_name``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r and "top1" not in r]
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1.0, alpha=0.4, label="logged")
    k = max(1, len(losses) // 12)  # moving average over ~1/12 of the run
    if k > 1:
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2.0, label=f"moving average of {k}")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "STAR pretraining")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # the labels as PNG text too, for whoever reads the file without looking at it
    fig.savefig(out_path, metadata={"Title": title or "STAR pretraining",
                                    "Description": f"{ylabel} against optimizer step"})
    plt.close(fig)
    return out_path
