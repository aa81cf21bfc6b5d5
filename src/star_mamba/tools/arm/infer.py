"""Shape inference: the ``StarConfig`` an ARM state dict was made with, read from its shapes
(the fields that are not in the weights follow ARM's code: ``docs/convert_arm.md``)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from torch import Tensor

from ...errors import CheckpointError
from ...config import StarConfig
from .keys import LAYER, TARGETS
from .reading import check_arm_state_dict, detect_target


def _depth(sd: Mapping[str, Tensor]) -> int:
    layers = {int(m.group(1)) for k in sd if (m := LAYER.match(k))}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"ARM state dict has non-contiguous layers {sorted(layers)}")
    return len(layers)


def _ratio(hidden: int, dim: int) -> float:
    """A float r with ``int(r * dim) == hidden`` (how our config turns a ratio into a width)."""
    r = hidden / dim
    for _ in range(8):
        if int(r * dim) == hidden:
            return r
        r = math.nextafter(r, math.inf)
    raise CheckpointError(f"cannot express hidden width {hidden} as a ratio of {dim}")


def _square(n: int, what: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise CheckpointError(f"{what}: {n} tokens is not a square grid")
    return g


def infer_config(state_dict: Mapping[str, Tensor], target: Optional[str] = None) -> dict[str, Any]:
    """A full, validated ``StarConfig`` dict for an ARM state dict (``target`` auto-detected).

    From the shapes: embed_dim, patch_size, in_chans, img_size (position table length), depth,
    expand, d_state, d_conv, dt_rank, mlp_ratio, directions (which twins exist), num_classes,
    class token, decoder_dim / depth / mlp ratio, cluster_size (mask size). The rest follows
    ARM's code (``docs/convert_arm.md``).
    """
    sd = check_arm_state_dict(state_dict)
    target = target or detect_target(sd)
    if target not in TARGETS:
        raise CheckpointError(f"invalid target {target!r}; allowed: 'classifier', 'pretrain', None")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(w.shape)}; expected "
                         "(D, C, p, p) with square patches")
    d, c, p = w.shape[0], w.shape[1], w.shape[2]
    m = "layers.0.mixer."
    e = sd[m + "in_proj.weight"].shape[0] // 2
    if e % d:
        raise CheckpointError(f"mixer width {e} is not a multiple of embed_dim {d}")
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
            raise CheckpointError("ARM/Vim double class tokens ('cls_token_head', 'cls_token_tail') "
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
        raise CheckpointError("ARM state dict has no 'pos_embed': cannot tell the image size")
    cfg["img_size"] = _square(n, "pos_embed") * p
    config = StarConfig.from_dict(cfg)
    if target == "pretrain":
        config.validate_pretraining()
    return config.to_dict()
