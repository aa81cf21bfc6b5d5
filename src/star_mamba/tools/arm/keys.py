"""The key table: ARM's names -> ours, and how each value is transformed on the way.

Pure name rules and tensor reshuffles, no I/O; the table, the naming and the reasons for every
transform are in ``docs/convert_arm.md`` (ARM = OliverRensu/ARM @996d93eb).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

TARGETS = ("classifier", "pretrain")
TWINS = {"": 0, "_b": 1, "_c": 2, "_c_b": 3}  # ARM suffix -> our branch (direction_orders index)

LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_TWIN_LINEAR = re.compile(r"^mixer\.(conv1d|x_proj|dt_proj)(_c_b|_b|_c)?\.(weight|bias)$")
_TWIN_A = re.compile(r"^mixer\.A(_c_b|_b|_c)?_log$")
_TWIN_D = re.compile(r"^mixer\.D(_c_b|_b|_c)?$")
BLOCK_RULES = {  # ARM block-local name -> ours
    "norm1": "norm1", "norm2": "norm2", "mixer.in_proj": "mixer.in_proj",
    "mixer.out_proj": "mixer.out_proj", "mlp.w1": "mlp.fc1_g", "mlp.w2": "mlp.fc1_x",
    "mlp.w3": "mlp.fc2",
}
# decoder block: ARM name -> (our name, how the residual-channel permutation applies)
# "vec": a vector in residual space; "in": a Linear reading the residual (permute columns);
# "out": a Linear writing the residual (permute rows); None: untouched.
DEC_RULES = {
    "norm2_1.weight": ("norm_q.weight", "vec"), "norm2_1.bias": ("norm_q.bias", "vec"),
    "norm2_2.weight": ("norm_kv.weight", "vec"), "norm2_2.bias": ("norm_kv.bias", "vec"),
    "attn2.q.weight": ("attn.q.weight", "in"), "attn2.q.bias": ("attn.q.bias", None),
    "attn2.kv.weight": ("attn.kv.weight", "in"), "attn2.kv.bias": ("attn.kv.bias", None),
    "attn2.proj.weight": ("attn.proj.weight", "out"), "attn2.proj.bias": ("attn.proj.bias", "vec"),
    "norm2.weight": ("norm2.weight", "vec"), "norm2.bias": ("norm2.bias", "vec"),
    "mlp.fc1.weight": ("mlp.fc1.weight", "in"), "mlp.fc1.bias": ("mlp.fc1.bias", None),
    "mlp.fc2.weight": ("mlp.fc2.weight", "out"), "mlp.fc2.bias": ("mlp.fc2.bias", "vec"),
}
DEC_TOP = {  # ARM top-level decoder names -> ours
    "ar_token": ("decoder.query_token", "vec"),
    "ar_norm.weight": ("decoder.norm.weight", "vec"), "ar_norm.bias": ("decoder.norm.bias", "vec"),
    "ar_pred.weight": ("decoder.pred.weight", "in"), "ar_pred.bias": ("decoder.pred.bias", None),
}
PRETRAIN_MARKERS = ("ar_token", "enc2dec.weight", "ar_pred.weight", "dec_pos_embed")
CLASSIFIER_MARKERS = ("head.weight", "norm_f.weight", "cls_token")


def block_key(rest: str) -> Optional[str]:
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
    if module in BLOCK_RULES and kind in ("weight", "bias"):
        return f"{BLOCK_RULES[module]}.{kind}"
    return None


def permute(t: Tensor, how: Optional[str], perm: Optional[Tensor]) -> Tensor:
    """Apply the decoder's residual-channel permutation ``perm`` as ``how`` says (``DEC_RULES``)."""
    if perm is None or how is None:
        return t
    if how == "vec":
        return t[..., perm]
    if how == "in":
        return t[:, perm]
    return t[perm]  # "out"


def classifier_key(key, value, sd, cfg, put, report) -> None:
    """Place one of ARM's classifier keys outside the blocks: ``put(arm_key, ours, value, how)``
    takes it, ``report.unmatched`` records why not. ``sd`` is the whole ARM state dict."""
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


def pretrain_key(key, value, cfg, n_taps, perm, put, report) -> None:
    """Place one of ARM's pretraining keys outside the encoder blocks (tap norms, decoder), the
    decoder's channels permuted by ``perm`` (None: kept in order); as :func:`classifier_key`."""
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
    elif dec is not None and dec.group(2) in DEC_RULES:
        ours, how = DEC_RULES[dec.group(2)]
        put(key, f"decoder.blocks.{dec.group(1)}.{ours}", permute(value, how, perm),
            "decoder channel halves swapped" if perm is not None and how else None)
    elif key in DEC_TOP:
        ours, how = DEC_TOP[key]
        put(key, ours, permute(value, how, perm),
            "decoder channel halves swapped" if perm is not None and how else None)
    else:
        report.unmatched[key] = "no counterpart in our pretraining model"
