"""ARM checkpoint conversion: key table, forward equivalence with ARM's math, reports, errors.

The ARM state dicts here are generated from ARM's key names and shapes (OliverRensu/ARM,
models_pretrain.py, Finetuning/models_mamba.py, mamba_simple.py) and filled with random tensors;
ARM's forward is re-computed by hand from those tensors, following ARM's code line by line
(its flips, its transposed-grid class-token handling, its interleaved decoder memories, its
MAE position tables), so a swapped gate/value or direction would show up as a mismatch.
"""
import argparse
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from star_mamba.config import StarConfig
from star_mamba.checkpoint import load_checkpoint
from star_mamba.models.classifier import StarClassifier
from star_mamba.models.convert import load_pretrained
from star_mamba.tools.arm import (arm_to_star, convert_arm_checkpoint, infer_config,
                                  unwrap_arm_checkpoint)
from star_mamba.models.pretrain import StarPretrain
from star_mamba.ops.scan_reference import scan_reference

TWINS4 = ("", "_b", "_c", "_c_b")
TOL = dict(rtol=1e-4, atol=2e-5)  # our float32 model vs ARM's math in float64
CLS = dict(dim=32, depth=2, img=32, patch=8, classes=10)
PRE = dict(dim=32, depth=8, img=32, patch=8, cluster=2, dec=128)


# ------------------------------------------------------------------------ ARM key tables

def arm_block_shapes(i, D, twins, d_state=16, d_conv=4):
    """layers.i.* of ARM's Block (mamba_simple.Mamba with expand=1 + SwiGLU(D, D*4*2//3))."""
    E, R, H = D, math.ceil(D / 16), D * 4 * 2 // 3
    p = f"layers.{i}."
    shapes = {p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "norm2.weight": (D,),
              p + "norm2.bias": (D,), p + "mixer.in_proj.weight": (2 * E, D),
              p + "mixer.out_proj.weight": (D, E)}
    for s in twins:
        shapes.update({p + f"mixer.conv1d{s}.weight": (E, 1, d_conv),
                       p + f"mixer.conv1d{s}.bias": (E,),
                       p + f"mixer.x_proj{s}.weight": (R + 2 * d_state, E),
                       p + f"mixer.dt_proj{s}.weight": (E, R), p + f"mixer.dt_proj{s}.bias": (E,),
                       p + f"mixer.A{s}_log": (E, d_state), p + f"mixer.D{s}": (E,)})
    for w, (o, i_) in {"w1": (H, D), "w2": (H, D), "w3": (D, H)}.items():
        shapes[p + f"mlp.{w}.weight"] = (o, i_)
        shapes[p + f"mlp.{w}.bias"] = (o,)
    return shapes


def mae_sincos(dim, grid):
    """utils/pos_embed.get_2d_sincos_pos_embed, written out: (grid*grid, dim)."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    axis = np.arange(grid, dtype=np.float32)
    mesh = np.meshgrid(axis, axis)  # "here w goes first": mesh[0][i, j] = j, the column
    return torch.from_numpy(np.concatenate([one(dim // 2, mesh[0]), one(dim // 2, mesh[1])],
                                           axis=1)).float()


def arm_mask(segments, tokens):
    """models_pretrain.VisionMamba.mask_generate."""
    mask = torch.tril(torch.ones(segments, segments))
    mask = mask.masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0)
    return mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def fill(shapes, seed=0, dtype=torch.float64):
    """Random tensors of sensible scale: norms near 1, Mamba's A_log, dt bias and D near init."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=dtype)
        if "norm" in k and k.endswith(".weight"):
            t = 1 + 0.2 * t
        elif re.search(r"\.A(_c_b|_b|_c)?_log$", k):
            t = torch.log(torch.arange(1, shape[1] + 1, dtype=dtype)).expand(shape) + 0.1 * t
        elif re.search(r"\.dt_proj(_c_b|_b|_c)?\.bias$", k):
            t = -2.0 + 0.5 * t
        elif re.search(r"\.D(_c_b|_b|_c)?$", k):
            t = 1 + 0.3 * t
        else:
            t = t * (0.5 if len(shape) == 1 else 1.0 / math.sqrt(shape[-1]))
        sd[k] = t.contiguous()
    return sd


def arm_classifier_state(twins=TWINS4, seed=0, dtype=torch.float64, **kw):
    """Finetuning/models_mamba.ARM: patch_embed, cls_token, pos_embed (N+1), layers, norm_f, head."""
    c = {**CLS, **kw}
    D, p, n = c["dim"], c["patch"], (c["img"] // c["patch"]) ** 2
    shapes = {"patch_embed.proj.weight": (D, 3, p, p), "patch_embed.proj.bias": (D,),
              "cls_token": (1, 1, D), "pos_embed": (1, n + 1, D),
              "norm_f.weight": (D,), "norm_f.bias": (D,),
              "head.weight": (c["classes"], D), "head.bias": (c["classes"],)}
    for i in range(c["depth"]):
        shapes.update(arm_block_shapes(i, D, twins))
    return fill(shapes, seed, dtype)


def arm_pretrain_state(seed=1, dtype=torch.float64, **kw):
    """models_pretrain.VisionMamba: encoder without final norm, norm_1..4, enc2dec, decoder."""
    c = {**PRE, **kw}
    D, Dd, p, g = c["dim"], c["dec"], c["patch"], c["img"] // c["patch"]
    l = c["cluster"] ** 2
    shapes = {"patch_embed.proj.weight": (D, 3, p, p), "patch_embed.proj.bias": (D,),
              "ar_token": (1, 1, Dd), "enc2dec.weight": (4 * Dd, 4 * D), "enc2dec.bias": (4 * Dd,),
              "ar_norm.weight": (Dd,), "ar_norm.bias": (Dd,),
              "ar_pred.weight": (p * p * 3, Dd), "ar_pred.bias": (p * p * 3,)}
    for i in range(c["depth"]):
        shapes.update(arm_block_shapes(i, D, ("",)))
    for k in range(1, 5):
        shapes.update({f"norm_{k}.weight": (D,), f"norm_{k}.bias": (D,)})
    for i in range(4):
        b = f"dec_block.{i}."
        shapes.update({b + "attn2.q.weight": (Dd, Dd), b + "attn2.q.bias": (Dd,),
                       b + "attn2.kv.weight": (2 * Dd, Dd), b + "attn2.kv.bias": (2 * Dd,),
                       b + "attn2.proj.weight": (Dd, Dd), b + "attn2.proj.bias": (Dd,),
                       b + "norm2_1.weight": (Dd,), b + "norm2_1.bias": (Dd,),
                       b + "norm2_2.weight": (Dd,), b + "norm2_2.bias": (Dd,),
                       b + "norm2.weight": (Dd,), b + "norm2.bias": (Dd,),
                       b + "mlp.fc1.weight": (4 * Dd, Dd), b + "mlp.fc1.bias": (4 * Dd,),
                       b + "mlp.fc2.weight": (Dd, 4 * Dd), b + "mlp.fc2.bias": (Dd,)})
    sd = fill(shapes, seed, dtype)
    # fixed tables ARM stores in its state dict (Parameters with requires_grad=False, a buffer)
    sd["pos_embed"] = mae_sincos(D, g).unsqueeze(0).to(dtype)
    sd["dec_pos_embed"] = mae_sincos(Dd, g).unsqueeze(0).to(dtype)
    sd["mask"] = arm_mask(g * g // l - 1, l)
    return sd


# ------------------------------------------------------------------------ ARM's forward, by hand

def ln(x, sd, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def arm_inner(sd, pre, xz, s):
    """mamba_inner_fn_no_out_proj: causal conv + SiLU, x_proj, dt_proj, selective scan gated by z."""
    L = xz.shape[-1]
    u, z = xz.chunk(2, dim=1)
    w = sd[pre + f"conv1d{s}.weight"][:, 0]  # (E, K): causal depthwise conv, written out
    padded = F.pad(u, (w.shape[-1] - 1, 0))
    u = sum(padded[..., k:k + L] * w[:, k, None] for k in range(w.shape[-1]))
    u = F.silu(u + sd[pre + f"conv1d{s}.bias"][:, None])
    x_dbl = u.transpose(1, 2) @ sd[pre + f"x_proj{s}.weight"].T  # (B, L, R + 2N)
    R, N = sd[pre + f"dt_proj{s}.weight"].shape[1], sd[pre + f"A{s}_log"].shape[1]
    dt, Bm, Cm = x_dbl.split([R, N, N], dim=-1)
    delta = (dt @ sd[pre + f"dt_proj{s}.weight"].T).transpose(1, 2)
    return scan_reference(u, delta, -torch.exp(sd[pre + f"A{s}_log"]), Bm.transpose(1, 2),
                          Cm.transpose(1, 2), D=sd[pre + f"D{s}"], z=z,
                          delta_bias=sd[pre + f"dt_proj{s}.bias"], delta_softplus=True)


def arm_mixer(sd, pre, x, twins):
    """mamba_simple.Mamba.forward: plain (pretraining) or bimamba_type v3 (fine-tuning)."""
    B, L, _ = x.shape
    xz = (x @ sd[pre + "in_proj.weight"].T).transpose(1, 2)  # (B, 2E, L)
    E = xz.shape[1] // 2
    if twins == ("",):
        return arm_inner(sd, pre, xz, "").transpose(1, 2) @ sd[pre + "out_proj.weight"].T
    out = arm_inner(sd, pre, xz, "")
    out_b = arm_inner(sd, pre, xz.flip([-1]), "_b")
    tp, g = L // 2, int(np.sqrt(L))
    cls, xc = xz[:, :, tp:tp + 1], torch.cat([xz[:, :, :tp], xz[:, :, tp + 1:]], dim=-1)
    xc = xc.reshape(B, 2 * E, g, g).permute(0, 1, 3, 2).reshape(B, 2 * E, -1)
    xc = torch.cat((xc[:, :, :tp], cls, xc[:, :, tp:]), dim=-1)
    out_c = arm_inner(sd, pre, xc, "_c")
    out_c_b = arm_inner(sd, pre, xc.flip([-1]), "_c_b")
    out_c = out_c + out_c_b.flip([-1])
    cls, out_c = out_c[:, :, tp:tp + 1], torch.cat([out_c[:, :, :tp], out_c[:, :, tp + 1:]], -1)
    out_c = out_c.reshape(B, E, g, g).permute(0, 1, 3, 2).reshape(B, E, -1)
    out_c = torch.cat((out_c[:, :, :tp], cls, out_c[:, :, tp:]), dim=-1)
    out = out + out_b.flip([-1])
    return ((out + out_c) / 4.0).transpose(1, 2) @ sd[pre + "out_proj.weight"].T


def arm_block(sd, i, x, twins):
    p = f"layers.{i}."
    x = x + arm_mixer(sd, p + "mixer.", ln(x, sd, p + "norm1"), twins)
    y = ln(x, sd, p + "norm2")
    hidden = F.silu(lin(y, sd, p + "mlp.w1")) * lin(y, sd, p + "mlp.w2")  # SwiGLU: w1 is the gate
    return x + lin(hidden, sd, p + "mlp.w3")


def arm_patches(sd, images):
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=w.shape[-1])
    return x.flatten(2).transpose(1, 2)  # (B, N, D)


def arm_classifier_forward(sd, images, depth, twins=TWINS4):
    """Finetuning/models_mamba.ARM.forward with global_pool=True."""
    x = arm_patches(sd, images)
    B, M, _ = x.shape
    tp = M // 2
    x = torch.cat((x[:, :tp], sd["cls_token"].expand(B, -1, -1), x[:, tp:]), dim=1)
    x = x + sd["pos_embed"]
    for i in range(depth):
        x = arm_block(sd, i, x, twins)
    x = ln(x, sd, "norm_f")
    pooled = (x[:, :tp].mean(1) + x[:, tp + 1:].mean(1)) / 2.0
    return lin(pooled, sd, "head")


def to_clusters(x, c):
    """rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2) c", p1=c, p2=c) on (B, N, C)."""
    B, N, C = x.shape
    h = int(np.sqrt(N))
    x = x.reshape(B, h // c, c, h // c, c, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (h // c) ** 2, c * c, C)


def arm_attention(sd, name, q, kv, mask, heads):
    B, L, C = q.shape
    q = lin(q, sd, name + ".q").reshape(B, L, 1, heads, C // heads).permute(2, 0, 3, 1, 4)[0]
    kv = lin(kv, sd, name + ".kv").reshape(B, L, 2, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ kv[0].transpose(-2, -1)) * (C // heads) ** -0.5 + mask
    x = (attn.softmax(dim=-1) @ kv[1]).transpose(1, 2).reshape(B, L, C)
    return lin(x, sd, name + ".proj")


def arm_pretrain_forward(sd, images, depth, taps, cluster):
    """models_pretrain.VisionMamba.forward_features + forward_decoder -> (B, L, p*p*C)."""
    x = to_clusters(arm_patches(sd, images) + sd["pos_embed"], cluster)
    B, C = x.shape[0], x.shape[-1]
    h = x[:, :-1].reshape(B, -1, C)
    features = []
    for count in range(1, depth + 1):
        h = arm_block(sd, count - 1, h, ("",))
        if count in taps:
            features.append(h)
    features = [ln(f, sd, f"norm_{k + 1}") for k, f in enumerate(features)]
    lat = lin(torch.cat(features, dim=-1), sd, "enc2dec")
    lat = lat.reshape(B, lat.shape[1], lat.shape[2] // 4, 4)
    Dd = lat.shape[2]
    q = to_clusters(sd["ar_token"] + sd["dec_pos_embed"], cluster)[:, 1:].reshape(1, -1, Dd)
    q = q.repeat(B, 1, 1)
    for i in range(4):
        b = f"dec_block.{i}."
        q = q + arm_attention(sd, b + "attn2", ln(q, sd, b + "norm2_1"),
                              ln(lat[..., i], sd, b + "norm2_2"), sd["mask"], Dd // 64)
        q = q + lin(F.gelu(lin(ln(q, sd, b + "norm2"), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return lin(ln(q, sd, "ar_norm"), sd, "ar_pred")


# ------------------------------------------------------------------------ helpers

def converted_classifier(sd, **overrides):
    state, report = arm_to_star(sd, overrides=overrides or None)
    model = StarClassifier(StarConfig.from_dict(report.config)).eval()  # float32, as used
    model.load_state_dict(state, strict=True)
    return model, state, report


def block_copies(D, depth, twins, prefix):
    """The plain copies of the key table, written out: ARM key -> our key."""
    out = {"patch_embed.proj.weight": prefix + "patch_embed.proj.weight",
           "patch_embed.proj.bias": prefix + "patch_embed.proj.bias"}
    for i in range(depth):
        a, o = f"layers.{i}.", f"{prefix}blocks.{i}."
        for kind in ("weight", "bias"):
            out.update({a + f"norm1.{kind}": o + f"norm1.{kind}",
                        a + f"norm2.{kind}": o + f"norm2.{kind}",
                        a + f"mlp.w1.{kind}": o + f"mlp.fc1_g.{kind}",  # gate
                        a + f"mlp.w2.{kind}": o + f"mlp.fc1_x.{kind}",  # value
                        a + f"mlp.w3.{kind}": o + f"mlp.fc2.{kind}"})
        out[a + "mixer.in_proj.weight"] = o + "mixer.in_proj.weight"
        out[a + "mixer.out_proj.weight"] = o + "mixer.out_proj.weight"
        for k, s in enumerate(twins):
            br = o + f"mixer.branches.{k}."
            out.update({a + f"mixer.conv1d{s}.weight": br + "conv1d.weight",
                        a + f"mixer.conv1d{s}.bias": br + "conv1d.bias",
                        a + f"mixer.x_proj{s}.weight": br + "x_proj.weight",
                        a + f"mixer.dt_proj{s}.weight": br + "dt_proj.weight",
                        a + f"mixer.dt_proj{s}.bias": br + "dt_proj.bias",
                        a + f"mixer.A{s}_log": br + "A_log", a + f"mixer.D{s}": br + "D"})
    return out


# ------------------------------------------------------------------------ classifier

def test_infer_config_reads_shapes():
    cfg = infer_config(arm_classifier_state())
    assert (cfg["embed_dim"], cfg["depth"], cfg["img_size"], cfg["patch_size"]) == (32, 2, 32, 8)
    assert (cfg["directions"], cfg["class_token"], cfg["num_classes"]) == (4, "middle", 10)
    assert (cfg["d_state"], cfg["d_conv"], cfg["expand"], cfg["dt_rank"]) == (16, 4, 1, None)
    assert StarConfig.from_dict(cfg).mlp_hidden == 32 * 4 * 2 // 3
    assert cfg["norm_eps"] == 1e-5 and cfg["learnable_pos_embed"] and cfg["global_pool"] == "avg"
    pre = infer_config(arm_pretrain_state())
    assert (pre["decoder_dim"], pre["decoder_depth"], pre["decoder_heads"]) == (128, 4, 2)
    assert (pre["cluster_size"], pre["images_per_sequence"], pre["separator"]) == (2, 1, "none")
    assert pre["directions"] == 1 and pre["depth"] == 8 and pre["decoder_mlp_ratio"] == 4.0
    # ARM-B sizes: 768 wide, SwiGLU 2048, 224 px fine-tuning / 192 px pretraining
    base = arm_classifier_state(dim=768, depth=1, img=224, patch=16, classes=1000,
                                dtype=torch.float32)
    cfg = infer_config(base)
    assert (cfg["img_size"], StarConfig.from_dict(cfg).mlp_hidden) == (224, 2048)


def test_classifier_weights_land_in_place():
    sd = arm_classifier_state()
    model, state, report = converted_classifier(sd)
    assert report.target == "classifier" and report.complete, report.summary()
    copies = block_copies(32, 2, TWINS4, "backbone.")
    copies.update({"norm_f.weight": "backbone.norm.weight", "norm_f.bias": "backbone.norm.bias",
                   "head.weight": "head.weight", "head.bias": "head.bias"})
    for arm_key, ours in copies.items():
        assert report.mapped[arm_key] == ours
        torch.testing.assert_close(state[ours], sd[arm_key], rtol=0, atol=0)
    # the class token's position (row N // 2 = 8) is folded into the class token
    pos = sd["pos_embed"]
    torch.testing.assert_close(state["backbone.pos_embed"], torch.cat([pos[:, :8], pos[:, 9:]], 1))
    torch.testing.assert_close(state["cls_token"], sd["cls_token"] + pos[:, 8:9])
    assert set(report.mapped) == set(sd)  # every ARM key accounted for


def test_classifier_forward_equals_arm_math():
    torch.manual_seed(0)
    sd = arm_classifier_state()
    model, _, _ = converted_classifier(sd)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model(images.float()).double()
        arm = arm_classifier_forward(sd, images, depth=2)  # float64
    torch.testing.assert_close(ours, arm, **TOL)

    # one block alone: our block on ARM's inputs equals ARM's block math
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    with torch.no_grad():
        ours_block = model.backbone.blocks[1](x.float(), list(model.orders)).double()
    torch.testing.assert_close(ours_block, arm_block(sd, 1, x, TWINS4), **TOL)

    # the check is sensitive: ARM weights with gate/value or two directions swapped differ
    for a, b in (("mlp.w1", "mlp.w2"), ("mixer.conv1d_b", "mixer.conv1d_c")):
        bad = dict(sd)
        for kind in ("weight", "bias"):
            bad[f"layers.1.{a}.{kind}"], bad[f"layers.1.{b}.{kind}"] = \
                sd[f"layers.1.{b}.{kind}"], sd[f"layers.1.{a}.{kind}"]
        assert not torch.allclose(arm_block(bad, 1, x, TWINS4), ours_block, atol=1e-3)


def test_two_direction_twins_map_to_two_directions():
    sd = arm_classifier_state(twins=("", "_b"))
    model, state, report = converted_classifier(sd)
    assert report.config["directions"] == 2 and report.complete
    torch.testing.assert_close(state["backbone.blocks.0.mixer.branches.1.A_log"],
                               sd["layers.0.mixer.A_b_log"])


# ------------------------------------------------------------------------ pretraining

def test_pretrain_weights_land_and_forward_equals_arm_math():
    sd = arm_pretrain_state()
    state, report = arm_to_star(sd)
    assert report.target == "pretrain" and report.complete, report.summary()
    assert set(report.derived) == {"dec_pos_embed", "mask"}  # fixed tables, checked equal
    assert set(report.mapped) | set(report.derived) == set(sd)
    cfg = StarConfig.from_dict(report.config)
    model = StarPretrain(cfg).eval()
    model.load_state_dict(state, strict=True)
    # encoder: plain copies; norm_1..3 -> tap norms, norm_4 -> the encoder's final norm
    copies = block_copies(32, 8, ("",), "encoder.")
    copies.update({"pos_embed": "encoder.pos_embed", "norm_4.weight": "encoder.norm.weight",
                   **{f"norm_{k}.bias": f"decoder.tap_norms.{k - 1}.bias" for k in (1, 2, 3)}})
    for arm_key, ours in copies.items():
        assert report.mapped[arm_key] == ours
        torch.testing.assert_close(state[ours], sd[arm_key], rtol=0, atol=0)
    # decoder: memory i is ARM's interleaved channels 4c + i; residual halves swapped (MAE table)
    Dd = 128
    perm = torch.cat([torch.arange(64, 128), torch.arange(64)])
    w = sd["enc2dec.weight"].reshape(Dd, 4, -1)  # [c, i]
    torch.testing.assert_close(state["decoder.enc2dec.weight"],
                               w[perm].permute(1, 0, 2).reshape(4 * Dd, -1))
    torch.testing.assert_close(state["decoder.query_token"], sd["ar_token"][..., perm])
    torch.testing.assert_close(state["decoder.blocks.2.attn.kv.weight"],
                               sd["dec_block.2.attn2.kv.weight"][:, perm])
    torch.testing.assert_close(state["decoder.blocks.2.mlp.fc2.weight"],
                               sd["dec_block.2.mlp.fc2.weight"][perm])

    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model.forward_decoder(model.forward_encoder(images.float())).double()
        arm = arm_pretrain_forward(sd, images, depth=8, taps=cfg.taps, cluster=2)
    assert cfg.taps == (4, 5, 7, 8)
    torch.testing.assert_close(ours.reshape(2, -1, ours.shape[-1]), arm, **TOL)


def test_pretrain_decoder_positions_in_our_layout_need_no_permutation():
    sd = arm_pretrain_state()
    ours_layout = torch.cat([sd["dec_pos_embed"][..., 64:], sd["dec_pos_embed"][..., :64]], -1)
    sd["dec_pos_embed"] = ours_layout
    state, report = arm_to_star(sd)
    assert "equals our fixed" in report.derived["dec_pos_embed"]
    torch.testing.assert_close(state["decoder.query_token"], sd["ar_token"])
    model = StarPretrain(StarConfig.from_dict(report.config)).eval()
    model.load_state_dict(state, strict=True)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = model.forward_decoder(model.forward_encoder(images.float())).double()
        arm = arm_pretrain_forward(sd, images, depth=8, taps=(4, 5, 7, 8), cluster=2)
    torch.testing.assert_close(ours.reshape(2, -1, ours.shape[-1]), arm, **TOL)


# ------------------------------------------------------------------------ reports and errors

def test_unmatched_keys_are_reported_and_strict_refuses(tmp_path):
    sd = arm_classifier_state(dtype=torch.float32)
    sd["layers.0.mixer.gamma"] = torch.ones(32)  # ARM/Vim layer scale: not in our block
    sd["rope.freqs"] = torch.ones(4)
    sd["dec_pos_embed"] = torch.zeros(1, 16, 32)  # a pretraining-only table in a classifier
    _, report = arm_to_star(sd, target="classifier")
    assert set(report.unmatched) == {"layers.0.mixer.gamma", "rope.freqs", "dec_pos_embed"}
    assert "block" in report.unmatched["layers.0.mixer.gamma"]
    assert "layers.0.mixer.gamma" in report.summary()
    with pytest.raises(ValueError, match="it has both; pass target="):
        arm_to_star(sd)  # decoder and classifier keys: the caller must say which
    torch.save({"model": sd}, tmp_path / "arm.pth")
    with pytest.raises(ValueError, match="rope.freqs"):
        convert_arm_checkpoint(tmp_path / "arm.pth", tmp_path / "out.pth", "classifier", strict=True)
    assert not (tmp_path / "out.pth").exists()
    report = convert_arm_checkpoint(tmp_path / "arm.pth", tmp_path / "out.pth", "classifier")
    assert (tmp_path / "out.pth").is_file() and len(report.unmatched) == 3
    # our keys with no ARM source are listed as missing (and keep their initialisation)
    del sd["head.bias"], sd["layers.0.mixer.gamma"], sd["rope.freqs"], sd["dec_pos_embed"]
    _, report = arm_to_star(sd)
    assert report.missing == ["head.bias"] and not report.complete


def test_wrong_files_raise_clear_errors(tmp_path):
    torch.save({"weights": {"a": torch.ones(1)}, "epoch": 1}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        convert_arm_checkpoint(tmp_path / "other.pth", tmp_path / "out.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot load"):
        convert_arm_checkpoint(tmp_path / "text.pth", tmp_path / "out.pth")
    star = StarClassifier(StarConfig(img_size=32, patch_size=8, embed_dim=32, depth=1))
    with pytest.raises(ValueError, match="already a star-mamba"):
        arm_to_star(star.state_dict())
    with pytest.raises(ValueError, match="not an ARM state dict"):
        unwrap_arm_checkpoint(torch.ones(3))
    with pytest.raises(ValueError, match="pretrain model, not a classifier"):
        arm_to_star(arm_pretrain_state(), target="classifier")
    bad = arm_classifier_state(dtype=torch.float32)
    bad["layers.1.mixer.x_proj_c.weight"] = torch.zeros(30, 32)
    with pytest.raises(ValueError, match=r"layers\.1\.mixer\.x_proj_c\.weight.*\(30, 32\).*\(34, 32\)"):
        arm_to_star(bad)
    assert not (tmp_path / "out.pth").exists()


# ------------------------------------------------------------------------ files

def _arm_training_checkpoint(sd):
    """What ARM's misc.save_model writes: the weights under 'model' beside optimizer, args, ..."""
    ema = {k: v + 0.01 for k, v in sd.items()}
    return {"model": sd, "model_ema": ema, "epoch": 99, "max_accuracy": 80.0,
            "args": argparse.Namespace(model="arm_base_pz16", blr=5e-4, global_pool=True)}


def test_convert_classifier_checkpoint_reads_back_and_evaluates(tmp_path):
    from star_mamba.engine.config import load_config
    from star_mamba.data.build import classification_sets
    from star_mamba.tasks.finetune import evaluate_checkpoint
    sd = arm_classifier_state(dtype=torch.float32)
    torch.save(_arm_training_checkpoint(sd), tmp_path / "arm.pth")
    report = convert_arm_checkpoint(tmp_path / "arm.pth", tmp_path / "star.pth")
    assert report.complete and "model_ema" in " ".join(report.notes)
    saved = load_checkpoint(tmp_path / "star.pth")
    model = StarClassifier(StarConfig.from_dict(saved["model_config"])).eval()
    model.load_state_dict(saved["model"])  # strict: the checkpoint is complete
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), arm_classifier_forward(sd, images, 2),
                                   rtol=1e-4, atol=1e-4)
    ema = {k[len("module."):]: v for k, v in saved["extras"]["ema"].items()}
    torch.testing.assert_close(ema["head.weight"], sd["head.weight"] + 0.01)

    # star-mamba eval --checkpoint: a tiny image folder with the head's 10 classes
    for split in ("train", "val"):
        for cls in "abcdefghij":
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(2):
                arr = np.random.default_rng(i + 3 * ord(cls)).integers(0, 255, (32, 32, 3))
                Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "imgs" / split / cls / f"{i}.png")
    cfg = load_config("finetune/fashion_mnist", [
        "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.eval_split=val",
        "data.num_workers=0", "data.crop_pct=1.0", "optim.batch_size=4", "run.progress=false",
        "run.tensorboard=false", "run.threads=1", f"run.output_dir={tmp_path / 'eval'}"])
    result = evaluate_checkpoint(tmp_path / "star.pth", cfg)
    _, eval_set, _ = classification_sets(cfg.data, model.cfg, train=False)
    x = torch.stack([eval_set[i][0] for i in range(len(eval_set))])
    y = torch.tensor([eval_set[i][1] for i in range(len(eval_set))])
    with torch.no_grad():
        expected = 100 * (model(x).argmax(1) == y).float().mean().item()
    assert result["top1"] == pytest.approx(expected)
    # --ema reads the EMA weights: give them a head that ranks the classes the other way round
    saved["extras"]["ema"]["module.head.weight"] = -ema["head.weight"]
    torch.save(saved, tmp_path / "star_ema.pth")
    ema_model = StarClassifier(StarConfig.from_dict(saved["model_config"])).eval()
    ema_model.load_state_dict({**ema, "head.weight": -ema["head.weight"]})
    with torch.no_grad():
        expected_ema = 100 * (ema_model(x).argmax(1) == y).float().mean().item()
    result_ema = evaluate_checkpoint(tmp_path / "star_ema.pth", cfg, use_ema=True)
    assert result_ema["top1"] == pytest.approx(expected_ema)
    assert result_ema["loss"] != pytest.approx(result["loss"])  # not the raw weights


def test_convert_pretrain_checkpoint_feeds_finetuning(tmp_path):
    sd = arm_pretrain_state(dtype=torch.float32)
    torch.save({"model": sd, "epoch": 1599}, tmp_path / "arm.pth")
    report = convert_arm_checkpoint(tmp_path / "arm.pth", tmp_path / "star.pth", strict=True)
    saved = load_checkpoint(tmp_path / "star.pth")
    assert saved["model_config"]["images_per_sequence"] == 1 and report.target == "pretrain"
    StarPretrain(StarConfig.from_dict(saved["model_config"])).load_state_dict(saved["model"])
    # finetune run.pretrained=: the encoder loads into a 4-direction classifier
    clf = StarClassifier(StarConfig(img_size=32, patch_size=8, embed_dim=32, depth=8,
                                    directions=4, class_token="middle", learnable_pos_embed=True,
                                    num_classes=5, norm_eps=1e-5))
    load = load_pretrained(clf, tmp_path / "star.pth")
    assert load.new == ["cls_token", "head.weight", "head.bias"], load.summary()
    torch.testing.assert_close(clf.backbone.blocks[3].mixer.branches[2].x_proj.weight,
                               sd["layers.3.mixer.x_proj.weight"])
    torch.testing.assert_close(clf.backbone.pos_embed, sd["pos_embed"])


def test_cli_convert_arm(tmp_path, capsys):
    from star_mamba.cli import main
    sd = arm_classifier_state(dtype=torch.float32)
    sd["rope.freqs"] = torch.ones(4)
    torch.save(_arm_training_checkpoint(sd), tmp_path / "arm.pth")
    out = tmp_path / "star.pth"
    assert main(["convert-arm", str(tmp_path / "arm.pth"), "--out", str(out), "--strict"]) == 2
    assert "rope.freqs" in capsys.readouterr().err and not out.exists()
    assert main(["convert-arm", str(tmp_path / "arm.pth"), "--out", str(out),
                 "--set", "model.global_pool=cls"]) == 0
    printed = capsys.readouterr().out
    assert "1 unmatched" in printed and "unmatched rope.freqs" in printed and str(out) in printed
    saved = load_checkpoint(out)
    assert saved["model_config"]["global_pool"] == "cls"
    assert saved["converted_from"]["unmatched"] == {"rope.freqs": report_reason(sd)}
    model = StarClassifier(StarConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["model"])
    torch.testing.assert_close(model.head.weight, sd["head.weight"])
    assert main(["convert-arm", str(tmp_path / "arm.pth"), "--out", str(out), "--set", "oops"]) == 2
    assert "section.key=value" in capsys.readouterr().err
    assert main(["convert-arm", str(tmp_path / "arm.pth"), "--out", str(out),
                 "--set", "run.global_pool=cls"]) == 2
    assert "model fields only" in capsys.readouterr().err


def report_reason(sd):
    return arm_to_star(sd, target="classifier")[1].unmatched["rope.freqs"]
