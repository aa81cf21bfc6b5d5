"""Residual blocks: the MambaMLP encoder block and the decoder's cross-attention block."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, SwiGLU
from torch import Tensor, nn

from ..config import StarConfig
from ..ops.swiglu import swiglu_mlp
from .mamba import Mamba, MambaState


class SwiGLUMlp(SwiGLU):
    """timm's ``SwiGLU`` (its parameters and keys), run by ``ops.swiglu_mlp`` when ``fused``:
    one projection for gate and value, the product recomputed in the backward (fewer saved
    activations, the same outputs). Without dropout or a hidden norm, as the blocks build it."""

    def __init__(self, dim: int, hidden: int, fused: bool = False):
        super().__init__(dim, hidden, act_layer=nn.SiLU)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        if not self.fused:
            return super().forward(x)
        g, v, out = self.fc1_g, self.fc1_x, self.fc2
        return swiglu_mlp(x, g.weight, g.bias, v.weight, v.bias, out.weight, out.bias)


class MambaMLPBlock(nn.Module):
    """Pre-norm: x = x + Mamba(LN(x)); x = x + SwiGLU(LN(x)); both residuals with drop path."""

    def __init__(self, cfg: StarConfig, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mixer = Mamba.from_config(cfg)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = SwiGLUMlp(dim, cfg.mlp_hidden, fused=cfg.fused_ops)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, orders: Optional[Sequence[Tensor]] = None) -> Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.drop_path(self.mixer(self.norm1(x), orders))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def step(self, x: Tensor, state: MambaState) -> Tensor:
        """One token, (B, D) -> (B, D), for a causal block."""
        x = x + self.mixer.step(self.norm1(x), state)
        return x + self.mlp(self.norm2(x))


def flex_block_mask(mask: Tensor):
    """A FlexAttention ``BlockMask`` for the boolean (Lq, Lk) ``mask`` (True = may attend), on
    ``mask``'s device: blocks that ``mask`` rules out entirely are skipped, not computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    lq, lk = mask.shape
    return create_block_mask(mask_mod, None, None, lq, lk, device=mask.device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """FlexAttention, compiled once per process on CUDA (eager on the CPU: forward only, the
    unfused reference that the tests compare with SDPA)."""
    if q.device.type != "cuda":
        from torch.nn.attention.flex_attention import flex_attention as flex
        return flex(q, k, v, block_mask=block_mask)
    return _compiled_flex()(q, k, v, block_mask=block_mask)


class CrossAttention(nn.Module):
    """Multi-head attention from queries (B, Lq, D) to memory (B, Lk, D) through SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, Lq, D), memory: (B, Lk, D) -> q (B, h, Lq, D/h), k and v (B, h, Lk, D/h)."""
        b, lq, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, lq, h, d // h).transpose(1, 2)  # (B, h, Lq, d/h)
        k, v = self.kv(memory).reshape(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, Lk, d/h)
        return q, k, v

    def forward(self, x: Tensor, memory: Tensor, mask=None) -> Tensor:
        """mask: (Lq, Lk) bool, True = may attend (SDPA), or a FlexAttention ``BlockMask``
        (:func:`flex_block_mask`)."""
        b, lq, d = x.shape
        q, k, v = self.heads(x, memory)
        if mask is None or isinstance(mask, Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, Lq, d/h)
        else:
            out = flex_attention(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, lq, d))

    def attention_probs(self, x: Tensor, memory: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The softmax weights :meth:`forward` applies (SDPA returns none), (B, h, Lq, Lk) float32:
        each row sums to 1 over the keys ``mask`` allows and is 0 on the others. For
        diagnostics; ``forward`` is ``proj`` of these weights times v, heads merged."""
        q, k, _ = self.heads(x, memory)
        scores = q.float() @ k.float().transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, Lq, Lk)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)


class CrossAttentionBlock(nn.Module):
    """Decoder block without self-attention: x = x + Attn(LN(x), LN(mem)); x = x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-5):
        super().__init__()  # the decoder's width and heads (StarConfig.decoder_*)
        self.norm_q = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_kv = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, memory: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, Lq, D), memory: (B, Lk, D) -> (B, Lq, D)."""
        x = x + self.attn(self.norm_q(x), self.norm_kv(memory), mask)
        return x + self.mlp(self.norm2(x))
