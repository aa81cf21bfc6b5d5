"""The conversion: an ARM state dict -> ours plus a report of every key (:func:`arm_to_star`),
and the file-to-file entry of ``star-mamba convert-arm`` (:func:`convert_arm_checkpoint`).
Design notes: ``docs/convert_arm.md``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ...errors import CheckpointError
from ... import sequence as seq
from ...checkpoint import atomic_save
from ...config import StarConfig
from ...models.classifier import StarClassifier
from ...models.pos_embed import sincos_2d
from ...models.pretrain import StarPretrain
from .infer import infer_config
from .keys import LAYER, TARGETS, block_key, classifier_key, pretrain_key
from .reading import (check_arm_state_dict, detect_target, load_arm_file, model_kinds,
                      unwrap_arm_checkpoint)


@dataclass
class ArmReport:
    """What became of every key. ``mapped``: ARM key -> our key; ``transforms``: our key -> how
    its value differs from a plain copy; ``derived``: ARM buffers our model recomputes (checked
    equal); ``unmatched``: ARM key -> why it was not loaded; ``missing``: our keys with no ARM
    source (they keep their initialisation)."""

    target: str
    config: dict[str, Any]
    mapped: dict[str, str] = field(default_factory=dict)
    transforms: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unmatched and not self.missing

    def summary(self) -> str:
        lines = [f"ARM -> star-mamba {self.target}: {len(self.mapped)} mapped "
                 f"({len(self.transforms)} transformed), {len(self.derived)} derived, "
                 f"{len(self.unmatched)} unmatched, {len(self.missing)} missing"]
        lines += [f"  unmatched {k}: {why}" for k, why in self.unmatched.items()]
        lines += [f"  missing {k} (left at its initialisation)" for k in self.missing]
        lines += [f"  derived {k}: {why}" for k, why in self.derived.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _expected(cfg: StarConfig, target: str) -> dict[str, torch.Size]:
    """Our state-dict keys and shapes for ``cfg``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(cfg, target)
    return {k: v.shape for k, v in model.state_dict().items()}


def _decoder_permutation(sd: Mapping[str, Tensor], cfg: StarConfig, report: ArmReport
                         ) -> Optional[Tensor]:
    """Check ARM's decoder position table against ours; the residual permutation that fits."""
    dd, g = cfg.decoder_dim, cfg.grid_size
    if "dec_pos_embed" not in sd:
        report.notes.append("no 'dec_pos_embed' in the ARM file: decoder channels kept in "
                            "order (assumes ARM's queries used our position layout)")
        return None
    table = sd["dec_pos_embed"].float().reshape(-1, sd["dec_pos_embed"].shape[-1])
    ours = sincos_2d(dd, (g, g))
    half = torch.cat([torch.arange(dd // 2, dd), torch.arange(dd // 2)])
    if table.shape == ours.shape and torch.allclose(table, ours, atol=1e-5):
        report.derived["dec_pos_embed"] = "equals our fixed decoder query positions"
        return None
    if table.shape == ours.shape and torch.allclose(table[:, half], ours, atol=1e-5):
        report.derived["dec_pos_embed"] = ("MAE's 2D sin-cos table (column half first) = our "
                                           "fixed decoder positions with the halves swapped; "
                                           "the decoder's residual channels are permuted to match")
        return half
    report.unmatched["dec_pos_embed"] = (
        f"shape {tuple(sd['dec_pos_embed'].shape)} matches neither our fixed decoder query "
        f"positions (1, {g * g}, {dd}) nor their half-swapped (MAE) layout; our decoder "
        "recomputes its own, so the decoder queries differ from ARM's")
    return None


def _check_mask(sd: Mapping[str, Tensor], cfg: StarConfig, report: ArmReport) -> None:
    if "mask" not in sd:
        return
    ours = seq.block_causal_mask(cfg.num_segments - 1, cfg.tokens_per_segment)
    arm = sd["mask"]
    if arm.shape == ours.shape and torch.equal(arm == 0, ours):
        report.derived["mask"] = "equals our block-causal decoder mask (0 = may attend)"
    else:
        report.unmatched["mask"] = (f"ARM mask of shape {tuple(arm.shape)} differs from our "
                                    f"block-causal mask {tuple(ours.shape)}; ours is recomputed")


def arm_to_star(state_dict: Mapping[str, Tensor], target: Optional[str] = None,
                overrides: Optional[Mapping[str, Any]] = None
                ) -> tuple[dict[str, Tensor], ArmReport]:
    """Rename / reorder / fold an ARM state dict into ours.

    ``target``: ``classifier``, ``pretrain`` or None (auto-detect from the keys); ``overrides``:
    StarConfig fields changed after inference (e.g. ``global_pool``). Returns (our state dict,
    report); our keys with no ARM source are absent from the dict and listed in
    ``report.missing``. A shape that does not fit our model raises ``ValueError`` naming both keys
    and both shapes.
    """
    sd = check_arm_state_dict(state_dict)
    if target is not None and target not in TARGETS:
        raise CheckpointError(f"invalid target {target!r}; allowed: 'classifier', 'pretrain', None")
    kinds = model_kinds(sd)
    target = target or detect_target(sd)
    if kinds and target not in kinds:
        found = kinds.pop()
        hint = (" (to fine-tune from ARM pretraining weights, convert with target='pretrain' and "
                "pass the result to `star-mamba finetune --set run.pretrained=...`)"
                if found == "pretrain" else "")
        raise CheckpointError(f"this ARM state dict is a {found} model, not a {target}{hint}")
    config = infer_config(sd, target)
    if overrides:
        config = StarConfig.from_dict({**config, **overrides}).to_dict()
    cfg = StarConfig.from_dict(config)
    expected = _expected(cfg, target)
    report = ArmReport(target=target, config=config)
    out: dict[str, Tensor] = {}
    prefix = "backbone." if target == "classifier" else "encoder."

    def put(arm_key: str, ours: str, value: Tensor, how: Optional[str] = None) -> None:
        if ours not in expected:
            report.unmatched[arm_key] = (f"would be {ours!r}, which our {target} model does not "
                                         f"have (directions={cfg.directions}, "
                                         f"class_token={cfg.class_token!r})")
            return
        if tuple(value.shape) != tuple(expected[ours]):
            raise CheckpointError(f"shape mismatch: ARM {arm_key!r} {tuple(sd[arm_key].shape)} -> "
                             f"our {ours!r} {tuple(value.shape)}, but our model expects "
                             f"{tuple(expected[ours])}")
        out[ours] = value.clone()
        report.mapped[arm_key] = ours
        if how:
            report.transforms[ours] = how

    perm = _decoder_permutation(sd, cfg, report) if target == "pretrain" else None
    if target == "pretrain":
        _check_mask(sd, cfg, report)
    n_taps = len(cfg.taps)
    for key, value in sd.items():
        if key in report.derived or key in report.unmatched:
            continue
        layer = LAYER.match(key)
        if layer is not None:
            ours = block_key(layer.group(2))
            if ours is None:
                report.unmatched[key] = "no counterpart in our MambaMLP block"
            else:
                put(key, f"{prefix}blocks.{layer.group(1)}.{ours}", value)
        elif key.startswith("patch_embed.proj."):
            put(key, prefix + key, value)
        elif target == "classifier":
            classifier_key(key, value, sd, cfg, put, report)
        else:
            pretrain_key(key, value, cfg, n_taps, perm, put, report)
    report.missing = [k for k in expected if k not in out]
    if cfg.num_patches % 2 and target == "classifier" and cfg.class_token == "middle":
        report.notes.append(f"{cfg.num_patches} patches (odd): ARM's mixer puts the class token "
                            "at (N+1)//2 but its input at N//2, and its pooling is not a plain "
                            "mean; the converted model is not exactly ARM's")
    return out, report


def build_model(config: Mapping[str, Any] | StarConfig, target: str) -> torch.nn.Module:
    """Our model for a converted config (``report.config``)."""
    cfg = config if isinstance(config, StarConfig) else StarConfig.from_dict(config)
    return StarClassifier(cfg) if target == "classifier" else StarPretrain(cfg)


def load_converted(model: torch.nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Load converted weights; shape mismatches raise ``ValueError``; returns missing keys."""
    current = model.state_dict()
    for key, value in state.items():
        if key not in current:
            raise CheckpointError(f"converted key {key!r} is not in the model")
        if tuple(value.shape) != tuple(current[key].shape):
            raise CheckpointError(f"shape mismatch for {key!r}: converted {tuple(value.shape)}, model "
                             f"{tuple(current[key].shape)}")
    result = model.load_state_dict(dict(state), strict=False)
    return list(result.missing_keys)


def convert_arm_checkpoint(src_path: str | Path, out_path: str | Path,
                           target: Optional[str] = None, strict: bool = False,
                           overrides: Optional[Mapping[str, Any]] = None) -> ArmReport:
    """Convert an ARM ``.pth`` into a star-mamba checkpoint at ``out_path``.

    The output is ``{"model": state_dict, "model_config": config, "extras": {"ema": ...}
    (when ARM's file has ``model_ema``), "converted_from": provenance}``, the layout our trainer
    writes: a classifier loads with ``star-mamba eval --checkpoint`` (``--ema`` for the EMA
    weights), a pretraining model with ``star-mamba finetune --set run.pretrained=...``.
    ``strict=True`` refuses (``ValueError``) when any ARM key is unmatched or any of our keys is
    missing; otherwise missing keys keep our initialisation and are reported.
    """
    raw = load_arm_file(src_path)
    state, report = arm_to_star(unwrap_arm_checkpoint(raw), target, overrides)
    if strict and not report.complete:
        problems = [f"{k} ({why})" for k, why in report.unmatched.items()]
        problems += [f"{k} (missing: no ARM weight)" for k in report.missing]
        raise CheckpointError(f"strict ARM conversion of {src_path} failed; unmatched keys: "
                         + "; ".join(problems))
    model = build_model(report.config, report.target)
    load_converted(model, state)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = dict(model=weights, model_config=report.config)
    if isinstance(raw, Mapping) and isinstance(raw.get("model_ema"), Mapping):
        ema_state, _ = arm_to_star(check_arm_state_dict(raw["model_ema"]), report.target,
                                   overrides)
        load_converted(model, ema_state)  # our EMA layout: the full model under "module."
        payload["extras"] = {"ema": {f"module.{k}": v for k, v in model.state_dict().items()}}
        report.notes.append("ARM's model_ema converted too (extras.ema; use --ema)")
    payload["converted_from"] = dict(format="arm", source=str(src_path), target=report.target,
                                     summary=report.summary(), unmatched=dict(report.unmatched),
                                     missing=list(report.missing))
    atomic_save(payload, Path(out_path))
    return report
