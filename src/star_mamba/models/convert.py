"""Turn a STAR pretraining checkpoint into classifier weights, in one place.

- ``encoder.*`` (pretraining backbone) -> ``backbone.*`` (classifier backbone);
- the position table is interpolated from the pretraining grid to the fine-tuning grid
  (12 x 12 -> 14 x 14 for 192 -> 224 px);
- 1-direction mixers are widened to the classifier's 2 or 4 directions by copying the
  pretrained branch into every direction (the mixer averages the directions, so a widened mixer
  is the average of the pretrained mixer run over each scan order);
- decoder and separator weights are dropped.
Every key is reported as loaded, converted, new (left at its initialisation) or unused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import Tensor, nn

from ..checkpoint import model_differences, model_state
from ..config import WEIGHT_SHAPE_FIELDS
from ..errors import CheckpointError
from .pos_embed import interpolate_pos_embed, sincos_2d

_BRANCH = re.compile(r"^(backbone\.blocks\.\d+\.mixer\.branches\.)(\d+)(\..+)$")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # copied as they are
    converted: list[str] = field(default_factory=list)  # interpolated or copied into new directions
    new: list[str] = field(default_factory=list)  # not in the checkpoint: keep their init
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not in the classifier

    def summary(self) -> str:
        return (f"{len(self.loaded)} loaded, {len(self.converted)} converted, {len(self.new)} new "
                f"({', '.join(self.new) or '-'}), {len(self.unused)} unused")


def load_pretrained(classifier: nn.Module, source: str | Path | Mapping[str, Any]) -> LoadReport:
    """Load a pretraining checkpoint (path, engine checkpoint dict or state dict) into a classifier.

    A checkpoint whose backbone weights have other shapes is refused in one line naming the
    model fields that differ (:data:`WEIGHT_SHAPE_FIELDS`; without a model config, the first
    such weight)."""
    state, pre_cfg = model_state(source)
    target = classifier.state_dict()
    report = LoadReport()
    incoming: dict[str, Tensor] = {}
    for key, value in state.items():
        new_key = "backbone." + key[len("encoder."):] if key.startswith("encoder.") else key
        if new_key not in target and not _BRANCH.match(new_key):
            report.unused.append(key)
            continue
        incoming[new_key] = value
    _check_fit(incoming, target, pre_cfg, classifier,
               "the pretrained checkpoint" + ("" if isinstance(source, Mapping) else f" {source}"))
    result = {}
    for key, dest in target.items():
        if key in incoming and incoming[key].shape == dest.shape:
            result[key] = incoming[key]
            report.loaded.append(key)
            continue
        m = _BRANCH.match(key)
        source_key = f"{m.group(1)}0{m.group(3)}" if m else None
        if m and key not in incoming and source_key in incoming:  # widen 1 direction to many
            result[key] = incoming[source_key].clone()
            report.converted.append(key)
        elif key == "backbone.pos_embed":
            table = _pretrained_pos_embed(incoming.get(key), pre_cfg, dest.shape[-1])
            if table is None:
                report.new.append(key)
                continue
            old = int(round(table.shape[1] ** 0.5))
            new = int(round(dest.shape[1] ** 0.5))
            result[key] = interpolate_pos_embed(table, (old, old), (new, new))
            report.converted.append(key)
        else:
            report.new.append(key)  # a head for other classes included
    classifier.load_state_dict(result, strict=False)
    return report


def _check_fit(incoming: Mapping[str, Tensor], target: Mapping[str, Tensor],
               pre_cfg: Optional[dict], classifier: nn.Module, what: str) -> None:
    """Refuse backbone weights of another shape (the position table: of another width), naming
    the model fields that differ (:data:`WEIGHT_SHAPE_FIELDS`), else the first such weight."""
    def shape(key: str, tensor: Tensor) -> tuple[int, ...]:
        return tuple(tensor.shape[-1:] if key == "backbone.pos_embed" else tensor.shape)

    misfits = [k for k, v in incoming.items() if k.startswith("backbone.") and k in target
               and shape(k, v) != shape(k, target[k])]
    if not misfits:
        return
    fields = (model_differences(pre_cfg, classifier.cfg.to_dict(), WEIGHT_SHAPE_FIELDS)
              if pre_cfg is not None and hasattr(classifier, "cfg") else "")
    first = misfits[0]
    differs = fields or (f"{first}: shape {tuple(incoming[first].shape)} there, "
                         f"{tuple(target[first].shape)} here")
    raise CheckpointError(f"{what} does not fit this model ({differs}; {len(misfits)} backbone "
                          "weights of another shape); set those model fields to the "
                          "checkpoint's, or start from another checkpoint")


def _pretrained_pos_embed(table: Optional[Tensor], pre_cfg: Optional[dict], dim: int) -> Optional[Tensor]:
    """The pretraining position table: saved, or the fixed sin-cos table of its grid."""
    if table is not None:
        return table
    if pre_cfg is None or pre_cfg.get("learnable_pos_embed"):
        return None
    grid = pre_cfg["img_size"] // pre_cfg["patch_size"]
    return sincos_2d(dim, (grid, grid)).unsqueeze(0)
