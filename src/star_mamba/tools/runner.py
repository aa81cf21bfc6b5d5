"""One pretrain-then-evaluate run, resumable: the chain behind ``star-mamba ablate`` and the
experiments in ``experiments/``.

    pretrain (config + overrides, into its run dir; skipped for a from-scratch run)
      -> the checkpoint it left (``checkpoint-latest.pth`` by default)
      -> a probe scores its backbone (the converged linear probe, a fine-tune, ...)
      -> a result dict, written atomically to ``<run_dir>/result.json``

Run again with the same ``run_dir``, a finished run is read back from ``result.json``; an
unfinished one resumes (the engine picks up ``checkpoint-latest.pth`` in each run directory, and
a pretraining that has finished returns at once). Several runs may share one pretraining
(``Pretraining.run_dir``): it is trained once.

The probe is a parameter: ``Probe.kind`` names an entry of :data:`PROBES` (add one with
:func:`register_probe`) or is a callable ``fn(probe, pretrained, out_dir) -> {"top1": ..., ...}``
where ``pretrained`` is the checkpoint path (None: from scratch). Built in:
``representation`` (``star-mamba linprobe``: converged logistic regression and k-NN of the
frozen backbone; from scratch, a randomly initialised one) and ``finetune``.
:func:`pixel_baseline` scores raw pixels with the representation probe's settings, once per
directory.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from ..checkpoint import LATEST, write_json

RESULT = "result.json"
PIXELS = "raw_pixels.json"

ProbeFn = Callable[["Probe", Optional[Path], Path], dict[str, Any]]
PROBES: dict[str, ProbeFn] = {}


@dataclass(frozen=True)
class Pretraining:
    """A pretraining run: a config name or path and ``section.key=value`` overrides.

    ``run_dir``: where it runs (None: ``<run_dir>/pretrain`` of the run using it); give the same
    directory to several runs to share one pretraining. ``checkpoint``: the file in it that the
    probe starts from."""

    overrides: tuple[str, ...] = ()
    config: str = "pretrain/fashion_mnist"
    run_dir: Optional[Path] = None
    checkpoint: str = LATEST


@dataclass(frozen=True)
class Probe:
    """How a (pretrained or fresh) backbone is scored: ``kind`` (a name in :data:`PROBES` or a
    callable, see the module docstring), and the config and overrides it runs with (a
    ``linprobe`` config for ``representation``, a ``finetune`` one for ``finetune``)."""

    kind: Union[str, ProbeFn] = "representation"
    config: str = "linprobe/fashion_mnist"
    overrides: tuple[str, ...] = ()

    def function(self) -> ProbeFn:
        if callable(self.kind):
            return self.kind
        if self.kind not in PROBES:
            raise ValueError(f"invalid probe kind {self.kind!r}; allowed: {', '.join(PROBES)} "
                             "or a callable")
        return PROBES[self.kind]


def register_probe(name: str) -> Callable[[ProbeFn], ProbeFn]:
    """Decorator: make ``fn(probe, pretrained, out_dir) -> dict with "top1"`` the probe ``name``."""
    def add(fn: ProbeFn) -> ProbeFn:
        PROBES[name] = fn
        return fn
    return add


def probe_config(probe: Probe, pretrained: Optional[Path], out_dir: Path, task: str):
    """The probe's run config: its config and overrides, then the checkpoint and directory."""
    from ..engine.config import load_config
    return load_config(probe.config, [*probe.overrides,
                                      f"run.pretrained={pretrained if pretrained else 'null'}",
                                      f"run.output_dir={out_dir}"], task=task)


@register_probe("representation")
def frozen_representation(probe: Probe, pretrained: Optional[Path], out_dir: Path
                          ) -> dict[str, Any]:
    """``star-mamba linprobe`` (``tasks/linprobe.py``) on the frozen backbone: ``top1`` is the
    converged linear probe's test top-1, beside ``knn_top1`` and the chosen ``weight_decay``;
    the whole result is in ``out_dir/linprobe.json`` (its features cached there too)."""
    from ..tasks.linprobe import linprobe

    r = linprobe(probe_config(probe, pretrained, out_dir, "linprobe"))
    keys = ("linear_probe_top1", "knn_top1", "weight_decay", "heldout_top1", "feature_dim",
            "n_train", "n_test", "knn_k", "lr_converged", "seconds_features")
    return dict(top1=r["linear_probe_top1"], **{k: r[k] for k in keys})


@register_probe("finetune")
def train_classifier(probe: Probe, pretrained: Optional[Path], out_dir: Path) -> dict[str, Any]:
    """The engine's ``finetune()`` (``star-mamba finetune``); the score is its best top-1 on the
    evaluation split."""
    from ..tasks.finetune import finetune

    return dict(top1=finetune(probe_config(probe, pretrained, out_dir, "finetune"))["best"]["score"])


def pixel_baseline(directory: str | Path, probe: Probe = Probe()) -> dict[str, Any]:
    """The representation probe on raw pixels of the images ``probe`` reads (its linprobe
    config and overrides: data, budget, probe settings, seed), computed once: kept in
    ``directory/raw_pixels.json`` and read back while data and settings are the same.
    Returns ``linear_probe_top1``, ``knn_top1``, ``weight_decay``, ... (evaluation/probe.py)."""
    from ..tasks.linprobe import pixel_baseline as baseline

    cfg = probe_config(probe, None, Path(directory), "linprobe")
    return baseline(cfg, Path(directory) / PIXELS)


def pretrain_then_probe(run_dir: str | Path, probe: Probe,
                        pretraining: Optional[Pretraining] = None, *,
                        probe_dir: Optional[str | Path] = None,
                        meta: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Pretrain (unless ``pretraining`` is None), then probe from its checkpoint; resumable.

    ``run_dir`` holds ``result.json`` (and by default ``pretrain/`` and ``probe/``; ``probe_dir``
    puts the probe elsewhere). Returns ``{**meta, **probe's result, "pretrain_loss",
    "seconds", "pretrain_seconds", "probe_seconds"}``: ``pretrain_loss`` is the mean logged loss
    over the last tenth of the pretraining's steps (None from scratch), ``seconds`` the wall
    clock of the whole run, ``pretrain_seconds`` the pretraining's own training time.
    """
    from ..engine.config import load_config
    from ..tasks.pretrain import pretrain

    run_dir = Path(run_dir)
    done = run_dir / RESULT
    if done.exists():
        return json.loads(done.read_text())
    evaluate = probe.function()  # an unknown kind fails before any training
    start = time.perf_counter()
    pretrained, pre_loss, pre_seconds = None, None, 0.0
    if pretraining is not None:
        pre_dir = Path(pretraining.run_dir or run_dir / "pretrain")
        summary = pretrain(load_config(pretraining.config, [*pretraining.overrides,
                                                            f"run.output_dir={pre_dir}"]))
        pretrained = pre_dir / pretraining.checkpoint
        pre_loss = tail_loss(pre_dir / "metrics.jsonl")
        pre_seconds = summary["seconds"]
    probe_start = time.perf_counter()
    scores = evaluate(probe, pretrained, Path(probe_dir or run_dir / "probe"))
    end = time.perf_counter()
    result = {**(meta or {}), **scores, "pretrain_loss": pre_loss,
              "seconds": round(end - start, 1), "pretrain_seconds": round(pre_seconds, 1),
              "probe_seconds": round(end - probe_start, 1)}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(done, result)
    return result


def tail_loss(metrics: Path, fraction: float = 0.1) -> Optional[float]:
    """Mean logged loss over the last ``fraction`` of the logged steps of a ``metrics.jsonl``."""
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    if not losses:
        return None
    tail = losses[-max(1, math.ceil(len(losses) * fraction)):]
    return sum(tail) / len(tail)
