"""Load ARM checkpoints (pretraining and fine-tuning) into STAR models.

ARM ("Autoregressive Pretraining with Mamba in Vision", Ren et al., ICLR 2025) publishes
weights in the state-dict layout of its own classes. This module renames, reorders and folds
them into our ``StarPretrain`` / ``StarClassifier`` layout, reports every ARM key as mapped,
derived (a fixed buffer our model recomputes, checked equal) or unmatched (with the reason),
lists our keys that no ARM weight fills, and writes a checkpoint in our format.

Source of the ARM names and shapes
----------------------------------
Repository ``OliverRensu/ARM`` at commit ``996d93eb7be3f8d06ea06ae05f446f5467ab08d9``
(HEAD, 2025-05-30; the code files below were last changed in ``b8c5c3c7`` (pretraining side,
2024-06-12) and ``ca9fc21d`` (``Finetuning/``, 2024-06-13); later commits touch only the README):

- ``models_pretrain.py``: ``VisionMamba`` (pretraining; ``arm_{base,large,huge}_pz16``,
  ``bimamba_type="None"``: one causal direction, no final norm, four tap norms ``norm_1..4``,
  ``enc2dec``, ``ar_token``, ``dec_pos_embed``, ``dec_block``, ``ar_norm``, ``ar_pred``, and
  the persistent ``mask`` buffer);
- ``Finetuning/models_mamba.py``: ``ARM`` (fine-tuning classifier; ``bimamba_type="v3"``,
  class token in the middle, ``pos_embed`` of N+1 rows, ``norm_f``, ``head``);
- ``mamba_simple.py`` / ``Finetuning/mamba_simple.py``: the mixer and its direction twins;
- ``Finetuning/main_finetune.py`` (copies the pretrained mixer into ``_b``, ``_c``, ``_c_b``)
  and ``utils/pos_embed.py`` (MAE's 2D sin-cos table); ``utils/misc.py`` and
  ``Finetuning/util/misc.py`` (checkpoints are ``{"model": state_dict, "optimizer", "epoch",
  "scaler", "args"[, "model_ema", ...]}``).

Architecture facts read from that code
--------------------------------------
- Block (both models): ``x = x + Mamba(LN(x)); x = x + SwiGLU(LN(x))`` with ``nn.LayerNorm``
  (eps 1e-5; the ``rms_norm``/``fused_add_norm`` flags are ignored by ARM's ``Block``), SwiGLU
  hidden ``dim * 4 * 2 // 3``, ``expand=1``, ``d_state=16``, ``d_conv=4``, ``dt_rank=ceil(D/16)``.
- SwiGLU: ``w3(SiLU(w1(x)) * w2(x))``, so ``w1`` is the gate and ``w2`` the value. timm's
  ``SwiGLU`` (ours) computes ``fc2(SiLU(fc1_g(x)) * fc1_x(x))``: w1 -> fc1_g, w2 -> fc1_x,
  w3 -> fc2.
- Pretraining mixer: one direction (plain Mamba-1). Fine-tuning mixer (``v3``): four twins with
  their own conv1d, x_proj, dt_proj, A_log, D and shared in_proj / out_proj; ``""`` scans the
  raster sequence, ``_b`` its reverse (``xz.flip``), ``_c`` the transposed grid (class token
  taken out, patches column-major, class token put back at ``L // 2``), ``_c_b`` the reverse of
  that; ``out_proj((y + y_b + y_c + y_c_b) / 4)`` after mapping each back. That is exactly our
  ``direction_orders`` 0, 1, 2, 3 with the class token ``middle`` (index N // 2).
  ``_b`` alone (Vim's ``v2``) maps to our 2 directions.
- Class token: ARM adds ``pos_embed[:, N // 2]`` to the class token inserted at N // 2; ours
  gives the class token no position, so the class-token row is folded into ``cls_token``.
- Pretraining decoder: block i reads ``enc2dec(cat(norm_1(f6), .., norm_4(f12)))`` reshaped to
  ``(B, L, Dd, 4)`` and indexed ``[..., i]`` -- memory i is the *interleaved* channels
  ``4 c + i``; ours takes contiguous chunks, so enc2dec's rows are reordered.
- Position tables: ARM's are MAE's (``get_2d_sincos_pos_embed``: the first half of the channels
  encodes the column, the second the row); ours (``sincos_2d``) encode the row first. ARM's
  pretraining ``pos_embed`` is therefore carried verbatim as a learnable table
  (``learnable_pos_embed=True``); our decoder's query positions are a fixed buffer, so the
  decoder's residual channels are permuted (pi: swap the two halves) -- LayerNorm commutes with a
  channel permutation and every Linear reading or writing the residual stream is permuted to
  match -- which makes the converted decoder compute exactly ARM's function.

Key table (D = embed_dim, E = expand * D, R = dt_rank, N = d_state, H = SwiGLU hidden,
Dd = decoder width, P = ``backbone.`` (classifier) or ``encoder.`` (pretraining), s -> k is
the direction twin suffix -> branch index: "" -> 0, "_b" -> 1, "_c" -> 2, "_c_b" -> 3)

=======================================  ==========================================  ============
ARM key                                  our key                                     shape
=======================================  ==========================================  ============
patch_embed.proj.weight / .bias          P patch_embed.proj.weight / .bias           (D,C,p,p)/(D,)
layers.i.norm1.weight / .bias            P blocks.i.norm1.weight / .bias             (D,)
layers.i.norm2.weight / .bias            P blocks.i.norm2.weight / .bias             (D,)
layers.i.mixer.in_proj.weight            P blocks.i.mixer.in_proj.weight             (2E, D)
layers.i.mixer.out_proj.weight           P blocks.i.mixer.out_proj.weight            (D, E)
layers.i.mixer.conv1d{s}.weight / .bias  P blocks.i.mixer.branches.k.conv1d.*       (E,1,4)/(E,)
layers.i.mixer.x_proj{s}.weight          P blocks.i.mixer.branches.k.x_proj.weight   (R+2N, E)
layers.i.mixer.dt_proj{s}.weight / .bias P blocks.i.mixer.branches.k.dt_proj.*      (E, R)/(E,)
layers.i.mixer.A{s}_log                  P blocks.i.mixer.branches.k.A_log           (E, N)
layers.i.mixer.D{s}                      P blocks.i.mixer.branches.k.D               (E,)
layers.i.mlp.w1.weight / .bias (gate)    P blocks.i.mlp.fc1_g.weight / .bias         (H, D)/(H,)
layers.i.mlp.w2.weight / .bias (value)   P blocks.i.mlp.fc1_x.weight / .bias         (H, D)/(H,)
layers.i.mlp.w3.weight / .bias           P blocks.i.mlp.fc2.weight / .bias           (D, H)/(D,)
-- fine-tuning (``ARM``) --
pos_embed (1, N+1, D)                    backbone.pos_embed (1, N, D): row N//2 removed
cls_token (1, 1, D)                      cls_token = cls_token + pos_embed[:, N//2]
norm_f.weight / .bias                    backbone.norm.weight / .bias                (D,)
head.weight / .bias                      head.weight / .bias                         (K, D)/(K,)
-- pretraining (``VisionMamba``) --
pos_embed (1, N, D)                      encoder.pos_embed (learnable_pos_embed=True)
norm_1 .. norm_3 .weight / .bias         decoder.tap_norms.0 .. 2 .weight / .bias    (D,)
norm_4.weight / .bias                    encoder.norm.weight / .bias (the last tap is
                                         the last block, normed by our final norm)   (D,)
enc2dec.weight / .bias                   decoder.enc2dec.*: our row i*Dd + j is ARM
                                         row 4*pi(j) + i                             (4Dd,4D)/(4Dd,)
ar_token                                 decoder.query_token[..., pi]                (1, 1, Dd)
dec_block.i.norm2_1.* / norm2_2.*        decoder.blocks.i.norm_q.* / norm_kv.* [pi]  (Dd,)
dec_block.i.attn2.q.weight / .bias       decoder.blocks.i.attn.q.weight[:, pi]/.bias (Dd,Dd)/(Dd,)
dec_block.i.attn2.kv.weight / .bias      decoder.blocks.i.attn.kv.weight[:, pi]/.bias(2Dd,Dd)
dec_block.i.attn2.proj.weight / .bias    decoder.blocks.i.attn.proj.weight[pi]/[pi]  (Dd, Dd)
dec_block.i.norm2.*                      decoder.blocks.i.norm2.* [pi]               (Dd,)
dec_block.i.mlp.fc1.weight / .bias       decoder.blocks.i.mlp.fc1.weight[:, pi]/.bias(4Dd, Dd)
dec_block.i.mlp.fc2.weight / .bias       decoder.blocks.i.mlp.fc2.weight[pi]/[pi]    (Dd, 4Dd)
ar_norm.weight / .bias                   decoder.norm.* [pi]                         (Dd,)
ar_pred.weight / .bias                   decoder.pred.weight[:, pi] / .bias          (p*p*C, Dd)
dec_pos_embed (1, N, Dd)                 derived: our fixed ``dec_pos`` buffer (checked; sets pi)
mask ((G-1)c^2, (G-1)c^2), 0 / -inf      derived: our fixed block-causal ``mask`` buffer (checked)
=======================================  ==========================================  ============

pi is the identity when ARM's ``dec_pos_embed`` already equals our table, the half swap when
it is MAE's layout (ARM's code always writes MAE's). Everything else (double class tokens,
layer scale ``gamma``, Vim's ``v1`` twins with only ``A_b_log``, ...) is reported as unmatched.

Config fields that are not in the weights follow ARM's code: ``norm_eps=1e-5``, ``cluster_size``
from the mask (else 4), ``images_per_sequence=1``, ``separator="none"``, ``norm_target=True``,
``decoder_heads = Dd // 64``; fine-tuning: ``class_token="middle"``, ``global_pool="avg"``
(the README fine-tunes with ``--global_pool True``), ``learnable_pos_embed=True``. For an even
number of patches (every ARM size: 144, 196, 576) ARM's pooling ``(mean(left) + mean(right)) / 2``
equals our average over the patch tokens.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .. import sequence as seq
from ..config import StarConfig
from ..models.pos_embed import sincos_2d

TARGETS = ("classifier", "pretrain")
TWINS = {"": 0, "_b": 1, "_c": 2, "_c_b": 3}  # ARM suffix -> our branch (direction_orders index)

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_TWIN_LINEAR = re.compile(r"^mixer\.(conv1d|x_proj|dt_proj)(_c_b|_b|_c)?\.(weight|bias)$")
_TWIN_A = re.compile(r"^mixer\.A(_c_b|_b|_c)?_log$")
_TWIN_D = re.compile(r"^mixer\.D(_c_b|_b|_c)?$")
_BLOCK_RULES = {  # ARM block-local name -> ours
    "norm1": "norm1", "norm2": "norm2", "mixer.in_proj": "mixer.in_proj",
    "mixer.out_proj": "mixer.out_proj", "mlp.w1": "mlp.fc1_g", "mlp.w2": "mlp.fc1_x",
    "mlp.w3": "mlp.fc2",
}
# decoder block: ARM name -> (our name, how the residual-channel permutation applies)
# "vec": a vector in residual space; "in": a Linear reading the residual (permute columns);
# "out": a Linear writing the residual (permute rows); None: untouched.
_DEC_RULES = {
    "norm2_1.weight": ("norm_q.weight", "vec"), "norm2_1.bias": ("norm_q.bias", "vec"),
    "norm2_2.weight": ("norm_kv.weight", "vec"), "norm2_2.bias": ("norm_kv.bias", "vec"),
    "attn2.q.weight": ("attn.q.weight", "in"), "attn2.q.bias": ("attn.q.bias", None),
    "attn2.kv.weight": ("attn.kv.weight", "in"), "attn2.kv.bias": ("attn.kv.bias", None),
    "attn2.proj.weight": ("attn.proj.weight", "out"), "attn2.proj.bias": ("attn.proj.bias", "vec"),
    "norm2.weight": ("norm2.weight", "vec"), "norm2.bias": ("norm2.bias", "vec"),
    "mlp.fc1.weight": ("mlp.fc1.weight", "in"), "mlp.fc1.bias": ("mlp.fc1.bias", None),
    "mlp.fc2.weight": ("mlp.fc2.weight", "out"), "mlp.fc2.bias": ("mlp.fc2.bias", "vec"),
}
_DEC_TOP = {  # ARM top-level decoder names -> ours
    "ar_token": ("decoder.query_token", "vec"),
    "ar_norm.weight": ("decoder.norm.weight", "vec"), "ar_norm.bias": ("decoder.norm.bias", "vec"),
    "ar_pred.weight": ("decoder.pred.weight", "in"), "ar_pred.bias": ("decoder.pred.bias", None),
}
_PRETRAIN_MARKERS = ("ar_token", "enc2dec.weight", "ar_pred.weight", "dec_pos_embed")
_CLASSIFIER_MARKERS = ("head.weight", "norm_f.weight", "cls_token")


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


# ------------------------------------------------------------------------------ reading

def _describe_keys(keys) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "") or "none"


def check_arm_state_dict(state_dict: Any) -> dict[str, Tensor]:
    """A bare ARM state dict (DDP ``module.`` prefixes removed) or ``ValueError``."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"not an ARM state dict: expected a mapping of parameter names to "
                         f"tensors, got {type(state_dict).__name__}")
    sd = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v
          for k, v in state_dict.items()}
    if any(isinstance(k, str) and k.startswith(("backbone.", "encoder.")) for k in sd):
        raise ValueError("this is already a star-mamba state dict (keys 'backbone.*' / "
                         "'encoder.*'), not an ARM one; load it directly")
    if ("patch_embed.proj.weight" not in sd or "layers.0.mixer.in_proj.weight" not in sd
            or not all(isinstance(v, Tensor) for v in sd.values())):
        raise ValueError("not an ARM state dict: expected tensors under ARM's names "
                         "'patch_embed.proj.weight' and 'layers.<i>.mixer.in_proj.weight' "
                         "(ARM's VisionMamba / ARM classes, bare or wrapped under 'model'); got "
                         f"keys {_describe_keys(sd)}")
    return sd


def unwrap_arm_checkpoint(obj: Any, key: str = "model") -> dict[str, Tensor]:
    """ARM's ``{"model": state_dict, ...}`` (or ``key``, e.g. ``"model_ema"``) or a bare state dict."""
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
        return check_arm_state_dict(obj[key])
    if isinstance(obj, Mapping) and key != "model":
        raise ValueError(f"checkpoint has no {key!r} entry (top-level keys: {_describe_keys(obj)})")
    if isinstance(obj, Mapping) and obj and not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("not an ARM checkpoint: expected ARM's state dict (keys such as "
                         "'patch_embed.proj.weight', 'layers.0.mixer.in_proj.weight'), bare or "
                         f"under 'model'; got top-level keys {_describe_keys(obj)}")
    return check_arm_state_dict(obj)


def load_arm_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``; ARM's training checkpoints also hold ``args``, an
    ``argparse.Namespace``, which is allowed (it is a plain attribute container)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such ARM checkpoint: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickle that would run code
        raise ValueError(f"cannot load {path} as an ARM checkpoint (torch.load with "
                         f"weights_only=True): {e}") from e


def _kinds(sd: Mapping[str, Tensor]) -> set[str]:
    kinds = set()
    if any(k in sd for k in _PRETRAIN_MARKERS) or any(k.startswith("dec_block.") for k in sd):
        kinds.add("pretrain")
    if any(k in sd for k in _CLASSIFIER_MARKERS):
        kinds.add("classifier")
    return kinds


def detect_target(sd: Mapping[str, Tensor]) -> str:
    """``pretrain`` for ARM's ``VisionMamba`` (decoder keys), ``classifier`` for ``ARM``."""
    kinds = _kinds(sd)
    if len(kinds) == 1:
        return kinds.pop()
    what = "both" if kinds else "neither"
    raise ValueError(f"cannot tell whether this ARM state dict is a pretraining model (keys "
                     f"{_PRETRAIN_MARKERS}) or a classifier (keys {_CLASSIFIER_MARKERS}): it has "
                     f"{what}; pass target='pretrain' or 'classifier'")


# ------------------------------------------------------------------------------ config

def _depth(sd: Mapping[str, Tensor]) -> int:
    layers = {int(m.group(1)) for k in sd if (m := _LAYER.match(k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"ARM state dict has non-contiguous layers {sorted(layers)}")
    return len(layers)


def _ratio(hidden: int, dim: int) -> float:
    """A float r with ``int(r * dim) == hidden`` (how our config turns a ratio into a width)."""
    r = hidden / dim
    for _ in range(8):
        if int(r * dim) == hidden:
            return r
        r = math.nextafter(r, math.inf)
    raise ValueError(f"cannot express hidden width {hidden} as a ratio of {dim}")


def _square(n: int, what: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{what}: {n} tokens is not a square grid")
    return g


def infer_config(state_dict: Mapping[str, Tensor], target: Optional[str] = None) -> dict[str, Any]:
    """A full, validated ``StarConfig`` dict for an ARM state dict (``target`` auto-detected).

    From the shapes: embed_dim, patch_size, in_chans, img_size (position table length), depth,
    expand, d_state, d_conv, dt_rank, mlp_ratio, directions (which twins exist), num_classes,
    class token, decoder_dim / depth / mlp ratio, cluster_size (mask size). The rest follows
    ARM's code (see the module docstring).
    """
    sd = check_arm_state_dict(state_dict)
    target = target or detect_target(sd)
    if target not in TARGETS:
        raise ValueError(f"invalid target {target!r}; allowed: 'classifier', 'pretrain', None")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; expected "
                         "(D, C, p, p) with square patches")
    d, c, p = w.shape[0], w.shape[1], w.shape[2]
    m = "layers.0.mixer."
    e = sd[m + "in_proj.weight"].shape[0] // 2
    if e % d:
        raise ValueError(f"mixer width {e} is not a multiple of embed_dim {d}")
    dt_rank = sd[m + "dt_proj.weight"].shape[1]
    cfg: dict[str, Any] = dict(
        embed_dim=d, in_chans=c, patch_size=p, depth=_depth(sd), expand=e // d,
        d_state=sd[m + "A_log"].shape[1], d_conv=sd[m + "conv1d.weight"].shape[-1],
        dt_rank=None if dt_rank == math.ceil(d / 16) else dt_rank,
        mlp_ratio=_ratio(sd["layers.0.mlp.w1.weight"].shape[0], d), norm_eps=1e-5,
        learnable_pos_embed=True)
    n_pos = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    if target == "classifier":
        if "cls_token_head" in sd or "cls_token_tail" in sd:
            raise ValueError("ARM/Vim double class tokens ('cls_token_head', 'cls_token_tail') "
                             "are not supported: our classifier has one class token")
        has_cls = "cls_token" in sd
        directions = 4 if m + "A_c_log" in sd or m + "A_c_b_log" in sd else (
            2 if m + "conv1d_b.weight" in sd else 1)
        n = (n_pos - int(has_cls)) if n_pos is not None else None
        cfg.update(directions=directions, class_token="middle" if has_cls else "none",
                   global_pool="avg")
        if "head.weight" in sd:
            cfg["num_classes"] = sd["head.weight"].shape[0]
    else:
        n = n_pos
        dd = sd["ar_token"].shape[-1] if "ar_token" in sd else sd["enc2dec.weight"].shape[0] // 4
        n_dec = len({int(k.split(".")[1]) for k in sd if k.startswith("dec_block.")}) or 4
        fc1 = sd.get("dec_block.0.mlp.fc1.weight")
        heads = dd // 64 if dd >= 64 and dd % 64 == 0 else 1
        cluster = 4  # ARM hard-wires 4 x 4 clusters
        if "mask" in sd and n is not None:
            cluster = _square(n - sd["mask"].shape[0], "tokens per cluster (from 'mask')")
        cfg.update(directions=1, decoder_dim=dd, decoder_depth=n_dec, decoder_heads=heads,
                   decoder_mlp_ratio=(_ratio(fc1.shape[0], dd) if fc1 is not None else 4.0),
                   cluster_size=cluster, images_per_sequence=1, separator="none",
                   norm_target=True)
    if n is None:
        raise ValueError("ARM state dict has no 'pos_embed': cannot tell the image size")
    cfg["img_size"] = _square(n, "pos_embed") * p
    config = StarConfig.from_dict(cfg)
    if target == "pretrain":
        config.validate_pretraining()
    return config.to_dict()


# ------------------------------------------------------------------------------ mapping

def _expected(cfg: StarConfig, target: str) -> dict[str, torch.Size]:
    """Our state-dict keys and shapes for ``cfg``, built on the meta device (no memory)."""
    from ..models.classifier import StarClassifier
    from ..models.pretrain import StarPretrain
    with torch.device("meta"):
        model = StarClassifier(cfg) if target == "classifier" else StarPretrain(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _block_key(rest: str) -> Optional[str]:
    """ARM block-local name (after ``layers.i.``) -> ours, or None."""
    for pattern in (_TWIN_LINEAR, _TWIN_A, _TWIN_D):
        m = pattern.match(rest)
        if m is None:
            continue
        if pattern is _TWIN_LINEAR:
            name, twin, kind = m.group(1), m.group(2) or "", m.group(3)
            return f"mixer.branches.{TWINS[twin]}.{name}.{kind}"
        twin = m.group(1) or ""
        return f"mixer.branches.{TWINS[twin]}.{'A_log' if pattern is _TWIN_A else 'D'}"
    module, _, kind = rest.rpartition(".")
    if module in _BLOCK_RULES and kind in ("weight", "bias"):
        return f"{_BLOCK_RULES[module]}.{kind}"
    return None


def _permute(t: Tensor, how: Optional[str], perm: Optional[Tensor]) -> Tensor:
    if perm is None or how is None:
        return t
    if how == "vec":
        return t[..., perm]
    if how == "in":
        return t[:, perm]
    return t[perm]  # "out"


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
        raise ValueError(f"invalid target {target!r}; allowed: 'classifier', 'pretrain', None")
    kinds = _kinds(sd)
    target = target or detect_target(sd)
    if kinds and target not in kinds:
        found = kinds.pop()
        hint = (" (to fine-tune from ARM pretraining weights, convert with target='pretrain' and "
                "pass the result to `star-mamba finetune --set run.pretrained=...`)"
                if found == "pretrain" else "")
        raise ValueError(f"this ARM state dict is a {found} model, not a {target}{hint}")
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
            raise ValueError(f"shape mismatch: ARM {arm_key!r} {tuple(sd[arm_key].shape)} -> "
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
        layer = _LAYER.match(key)
        if layer is not None:
            ours = _block_key(layer.group(2))
            if ours is None:
                report.unmatched[key] = "no counterpart in our MambaMLP block"
            else:
                put(key, f"{prefix}blocks.{layer.group(1)}.{ours}", value)
        elif key.startswith("patch_embed.proj."):
            put(key, prefix + key, value)
        elif target == "classifier":
            _classifier_key(key, value, sd, cfg, put, report)
        else:
            _pretrain_key(key, value, cfg, n_taps, perm, put, report)
    report.missing = [k for k in expected if k not in out]
    if cfg.num_patches % 2 and target == "classifier" and cfg.class_token == "middle":
        report.notes.append(f"{cfg.num_patches} patches (odd): ARM's mixer puts the class token "
                            "at (N+1)//2 but its input at N//2, and its pooling is not a plain "
                            "mean; the converted model is not exactly ARM's")
    return out, report


def _classifier_key(key, value, sd, cfg, put, report) -> None:
    n = cfg.num_patches
    if key == "pos_embed":
        if value.shape[1] == n + 1:  # the class token's row sits at N // 2
            put(key, "backbone.pos_embed", torch.cat([value[:, : n // 2], value[:, n // 2 + 1:]], 1),
                f"ARM pos_embed without its class-token row {n // 2}")
        else:
            put(key, "backbone.pos_embed", value)
    elif key == "cls_token":
        pos = sd.get("pos_embed")
        if pos is not None and pos.shape[1] == n + 1:
            folded = (value.float() + pos[:, n // 2: n // 2 + 1].float()).to(value.dtype)
            put(key, "cls_token", folded, f"cls_token + pos_embed[:, {n // 2}] (ours adds no "
                                          "position to the class token)")
        else:
            put(key, "cls_token", value)
    elif key.startswith("norm_f."):
        put(key, "backbone.norm." + key[len("norm_f."):], value)
    elif key.startswith("head."):
        put(key, key, value)
    else:
        report.unmatched[key] = "no counterpart in our classifier"


def _pretrain_key(key, value, cfg, n_taps, perm, put, report) -> None:
    dd = cfg.decoder_dim
    tap = re.match(r"^norm_(\d+)\.(weight|bias)$", key)
    dec = re.match(r"^dec_block\.(\d+)\.(.+)$", key)
    if key == "pos_embed":
        put(key, "encoder.pos_embed", value, "ARM's fixed MAE-layout table, carried as a "
                                             "learnable table (learnable_pos_embed=True)")
    elif tap is not None:
        i, kind = int(tap.group(1)) - 1, tap.group(2)
        if not 0 <= i < n_taps:
            report.unmatched[key] = f"tap norm {i + 1} of {n_taps} decoder taps"
        elif cfg.taps[i] != cfg.depth:
            put(key, f"decoder.tap_norms.{i}.{kind}", value)
        elif i == n_taps - 1:
            put(key, f"encoder.norm.{kind}", value, "the last tap is the last block, normalised "
                                                    "by our encoder's final norm")
        else:
            report.unmatched[key] = f"tap {i + 1} reads the last block, whose norm is tap {n_taps}'s"
    elif key in ("enc2dec.weight", "enc2dec.bias"):
        j = torch.arange(dd)
        src = perm[j] if perm is not None else j  # our channel j is ARM channel src[j]
        rows = torch.cat([n_taps * src + i for i in range(n_taps)])  # ours i*Dd+j <- ARM 4*src+i
        how = (f"rows reordered: ARM block i reads channels {n_taps}c+i, ours a contiguous chunk"
               + ("; decoder channel halves swapped" if perm is not None else ""))
        put(key, "decoder." + key, value[rows] if value.shape[0] == n_taps * dd else value, how)
    elif dec is not None and dec.group(2) in _DEC_RULES:
        ours, how = _DEC_RULES[dec.group(2)]
        put(key, f"decoder.blocks.{dec.group(1)}.{ours}", _permute(value, how, perm),
            "decoder channel halves swapped" if perm is not None and how else None)
    elif key in _DEC_TOP:
        ours, how = _DEC_TOP[key]
        put(key, ours, _permute(value, how, perm),
            "decoder channel halves swapped" if perm is not None and how else None)
    else:
        report.unmatched[key] = "no counterpart in our pretraining model"


# ------------------------------------------------------------------------------ files

def build_model(config: Mapping[str, Any], target: str) -> torch.nn.Module:
    """Our model for a converted config (``report.config``)."""
    from ..models.classifier import StarClassifier
    from ..models.pretrain import StarPretrain
    cfg = StarConfig.from_dict(config)
    return StarClassifier(cfg) if target == "classifier" else StarPretrain(cfg)


def load_converted(model: torch.nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Load converted weights; shape mismatches raise ``ValueError``; returns missing keys."""
    current = model.state_dict()
    for key, value in state.items():
        if key not in current:
            raise ValueError(f"converted key {key!r} is not in the model")
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(f"shape mismatch for {key!r}: converted {tuple(value.shape)}, model "
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
    from ..checkpoint import atomic_save
    raw = load_arm_file(src_path)
    state, report = arm_to_star(unwrap_arm_checkpoint(raw), target, overrides)
    if strict and not report.complete:
        problems = [f"{k} ({why})" for k, why in report.unmatched.items()]
        problems += [f"{k} (missing: no ARM weight)" for k in report.missing]
        raise ValueError(f"strict ARM conversion of {src_path} failed; unmatched keys: "
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
