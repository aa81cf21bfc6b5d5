"""Which model is in a checkpoint, and that model, built and loaded: every command, tool and
experiment reads our checkpoints through here.

A checkpoint of ours is ``{"model": weights, "model_config": dict, ...}`` (training checkpoints
add the optimizer, state and ``extras.ema``; ``export`` writes the same as ``.safetensors``);
``checkpoint.model_state`` reads it from a path or a dict. Its kind follows from the weights:

* ``pretrain``: a :class:`~.pretrain.StarPretrain` (``encoder.*`` and ``decoder.*``);
* ``classifier``: a :class:`~.classifier.StarClassifier` (``backbone.*``; a classification head
  ``head.*`` unless it was built with ``num_classes=0``).

:func:`load_pretrain` rebuilds a pretraining model, :func:`load_classifier` a classifier as it
was trained, :func:`probe_classifier` the frozen classifier a probe reads from either kind (a
pretraining backbone as it was pretrained: causal, no class token, average pooling). Fine-tuning
starts a new classifier from a pretraining checkpoint through ``convert.load_pretrained``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

from torch import Tensor

from ..checkpoint import ema_state, load_checkpoint, model_state
from ..config import StarConfig
from ..errors import CheckpointError
from .classifier import StarClassifier
from .convert import load_pretrained
from .pretrain import StarPretrain

log = logging.getLogger("star_mamba")

Source = Union[str, Path, Mapping[str, Any]]
Kind = Literal["pretrain", "classifier"]


def kind_of(state: Mapping[str, Tensor]) -> Optional[Kind]:
    """``classifier`` (``backbone.*`` keys), ``pretrain`` (``encoder.*`` keys) or None."""
    if any(k.startswith("backbone.") for k in state):
        return "classifier"
    if any(k.startswith("encoder.") for k in state):
        return "pretrain"
    return None


def has_head(state: Mapping[str, Tensor]) -> bool:
    """Whether a classifier's weights hold a classification head."""
    return "head.weight" in state


def _build(model: Any, state: Mapping[str, Tensor], what: str):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"the weights in {what} do not fit its model config: "
                              f"{' '.join(str(e).split())}") from e
    return model


def load_pretrain(source: Source, name: Optional[str] = None, **overrides: Any) -> StarPretrain:
    """The :class:`StarPretrain` in a pretraining checkpoint (path, run directory or dict), in
    eval mode. ``name``: the checkpoint in messages (default: the path given); ``overrides``:
    runtime fields such as ``scan_backend``."""
    what = name or (source if not isinstance(source, Mapping) else "the checkpoint")
    state, cfg = model_state(source)  # a path (or run directory) is loaded there
    kind = kind_of(state)
    if kind != "pretrain" or not any(k.startswith("decoder.") for k in state):
        found = "a classifier (fine-tuning) checkpoint" if kind == "classifier" else "not a STAR model"
        raise CheckpointError(f"{what} is {found}; a pretraining checkpoint written by "
                              "`star-mamba pretrain` is needed (its decoder makes the predictions)")
    if cfg is None:
        raise CheckpointError(f"{what} stores no model config (model_config); cannot rebuild "
                              "the model")
    model = StarPretrain(StarConfig.from_dict({**cfg, **overrides}))
    return _build(model, state, str(what)).eval()


def check_classifier(state: Mapping[str, Tensor], name: Any = "the checkpoint",
                     head: bool = False) -> None:
    """Refuse weights that are not a classifier's (``head``: with a classification head)."""
    if kind_of(state) != "classifier" or (head and not has_head(state)):
        raise CheckpointError(f"{name} is not a classifier checkpoint written by star-mamba "
                              "finetune (pretraining checkpoints have no classifier head)")


def load_classifier(source: Source, ema: bool = False, head: bool = False,
                    name: Optional[str] = None, **overrides: Any) -> StarClassifier:
    """The :class:`StarClassifier` of a classifier checkpoint (``finetune``, ``convert-arm``),
    as it was trained, from its own ``model_config`` with ``overrides`` (runtime fields).
    ``ema``: its EMA weights instead; ``head``: it must have a classification head; ``name``:
    the checkpoint in messages (default: the path given)."""
    name = name or (str(source) if not isinstance(source, Mapping) else "the checkpoint")
    saved = load_checkpoint(source) if not isinstance(source, Mapping) else source
    state, cfg = model_state(saved)
    check_classifier(state, name, head)
    if cfg is None:
        raise CheckpointError(f"{name}: the classifier checkpoint holds no model_config to "
                              "rebuild it from")
    if ema:
        state = ema_state(saved, name)
    return _build(StarClassifier(StarConfig.from_dict({**cfg, **overrides})), state, name)


def probe_classifier(source: Source, **overrides: Any) -> StarClassifier:
    """The frozen classifier a probe reads from any checkpoint of ours (path or dict).

    A classifier checkpoint is :func:`load_classifier`'s. A pretraining checkpoint gives its
    backbone as pretrained: its ``model_config`` with ``directions=1`` (causal), no class
    token, average pooling and no drop path; ``overrides`` change any field (``directions=4``
    widens the mixers, see :func:`~.convert.load_pretrained`). Raises if a backbone weight is
    not in the checkpoint.
    """
    state, cfg = model_state(source)
    if kind_of(state) == "classifier":
        return load_classifier({"model": state, "model_config": cfg}, **overrides)
    values = dict(cfg or {})
    values.update(directions=1, class_token="none", global_pool="avg", drop_path_rate=0.0)
    values.update(overrides)
    model = StarClassifier(StarConfig.from_dict(values))
    report = load_pretrained(model, {"model": state, "model_config": cfg})
    missing = [k for k in report.new if k.startswith("backbone.")]
    if missing:
        raise CheckpointError(
            f"the checkpoint does not hold the backbone's {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing): not a STAR "
            "pretraining checkpoint of this model?")
    log.info(f"probe backbone: {report.summary()}")
    return model


__all__ = ["check_classifier", "has_head", "kind_of", "load_classifier", "load_pretrain", "probe_classifier",
           "resolve"]
