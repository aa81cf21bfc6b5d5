"""Reading ARM files: ``torch.load``, unwrapping ``{"model": ...}``, checking that a state dict
is ARM's, and telling a pretraining model from a classifier (see ``docs/convert_arm.md``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ...checkpoint import unsafe_pickle_error, why_unloadable
from ...errors import CheckpointError, MissingFileError
from .keys import CLASSIFIER_MARKERS, PRETRAIN_MARKERS


def _describe_keys(keys) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "") or "none"


def check_arm_state_dict(state_dict: Any) -> dict[str, Tensor]:
    """A bare ARM state dict (DDP ``module.`` prefixes removed) or ``ValueError``."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"not an ARM state dict: expected a mapping of parameter names to "
                         f"tensors, got {type(state_dict).__name__}")
    sd = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v
          for k, v in state_dict.items()}
    if any(isinstance(k, str) and k.startswith(("backbone.", "encoder.")) for k in sd):
        raise CheckpointError("this is already a star-mamba state dict (keys 'backbone.*' / "
                         "'encoder.*'), not an ARM one; load it directly")
    if ("patch_embed.proj.weight" not in sd or "layers.0.mixer.in_proj.weight" not in sd
            or not all(isinstance(v, Tensor) for v in sd.values())):
        raise CheckpointError("not an ARM state dict: expected tensors under ARM's names "
                         "'patch_embed.proj.weight' and 'layers.<i>.mixer.in_proj.weight' "
                         "(ARM's VisionMamba / ARM classes, bare or wrapped under 'model'); got "
                         f"keys {_describe_keys(sd)}")
    return sd


def unwrap_arm_checkpoint(obj: Any, key: str = "model") -> dict[str, Tensor]:
    """ARM's ``{"model": state_dict, ...}`` (or ``key``, e.g. ``"model_ema"``) or a bare state dict."""
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
        return check_arm_state_dict(obj[key])
    if isinstance(obj, Mapping) and key != "model":
        raise CheckpointError(f"checkpoint has no {key!r} entry (top-level keys: {_describe_keys(obj)})")
    if isinstance(obj, Mapping) and obj and not any(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError("not an ARM checkpoint: expected ARM's state dict (keys such as "
                         "'patch_embed.proj.weight', 'layers.0.mixer.in_proj.weight'), bare or "
                         f"under 'model'; got top-level keys {_describe_keys(obj)}")
    return check_arm_state_dict(obj)


def load_arm_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``; ARM's training checkpoints also hold ``args``, an
    ``argparse.Namespace``, which is allowed (it is a plain attribute container)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such ARM checkpoint: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickle that would run code
        raise (unsafe_pickle_error(path, e)
               or CheckpointError(f"cannot load {path} as an ARM checkpoint (torch.load with "
                                  f"weights_only=True): {why_unloadable(path, e)}")) from e


def model_kinds(sd: Mapping[str, Tensor]) -> set[str]:
    """Which of ARM's models the keys point to: ``pretrain``, ``classifier``, both or neither."""
    kinds = set()
    if any(k in sd for k in PRETRAIN_MARKERS) or any(k.startswith("dec_block.") for k in sd):
        kinds.add("pretrain")
    if any(k in sd for k in CLASSIFIER_MARKERS):
        kinds.add("classifier")
    return kinds


def detect_target(sd: Mapping[str, Tensor]) -> str:
    """``pretrain`` for ARM's ``VisionMamba`` (decoder keys), ``classifier`` for ``ARM``."""
    kinds = model_kinds(sd)
    if len(kinds) == 1:
        return kinds.pop()
    what = "both" if kinds else "neither"
    raise CheckpointError(f"cannot tell whether this ARM state dict is a pretraining model (keys "
                     f"{PRETRAIN_MARKERS}) or a classifier (keys {CLASSIFIER_MARKERS}): it has "
                     f"{what}; pass target='pretrain' or 'classifier'")
