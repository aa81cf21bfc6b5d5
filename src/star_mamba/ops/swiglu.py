"""SwiGLU MLP in one autograd node: ``fc2(silu(x W_g^T + b_g) * (x W_x^T + b_x))``.

timm's ``SwiGLU`` runs two input projections (``fc1_g``, ``fc1_x``) and keeps, for the backward,
the input, the gate, its SiLU, the value and their product: 4 hidden-width tensors and one of
the input width per token (counted in ``tests/test_fused_ops.py``). Here the
two projections are one GEMM over the concatenated weights (so the input is read, and cast,
once) and the backward keeps only the input, in the compute dtype, and the projection's output
``h = [gate, value]``: 2 hidden-width tensors. The SiLU and the product are recomputed from ``h``
in the backward (elementwise, cheap beside the GEMMs). The weights stay the two ``fc1_*``
parameters, so checkpoints are the same either way.

Under autocast the GEMMs run in the autocast dtype, as ``F.linear`` would, and the gradients of
the (float32) weights come back in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would compute in here: autocast's, where it is on, else ``x``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _gate(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h: (..., 2H) -> gate, value, silu(gate) * value, each (..., H)."""
    g, v = h.chunk(2, dim=-1)
    return g, v, F.silu(g) * v


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                b2: Optional[Tensor]) -> Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, w1c, w2c = x.to(dtype), w1.to(dtype), w2.to(dtype)
            h = F.linear(xc, w1c, None if b1 is None else b1.to(dtype))  # (..., 2H)
            out = F.linear(_gate(h)[2], w2c, None if b2 is None else b2.to(dtype))
        ctx.save_for_backward(xc, w1, w2, h)
        ctx.has_bias, ctx.x_dtype = (b1 is not None, b2 is not None), x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xc, w1, w2, h = ctx.saved_tensors
        dtype = h.dtype
        grad_out = grad_out.to(dtype)
        g, v, p = _gate(h)
        flat_out, flat_p = grad_out.reshape(-1, grad_out.shape[-1]), p.reshape(-1, p.shape[-1])
        grad_w2 = flat_out.t() @ flat_p
        grad_b2 = flat_out.sum(0) if ctx.has_bias[1] else None
        grad_p = grad_out @ w2.to(dtype)
        sig = torch.sigmoid(g)
        grad_v = grad_p * (g * sig)
        grad_g = grad_p * v * (sig * (1 + g * (1 - sig)))  # d silu(g) / dg
        grad_h = torch.cat([grad_g, grad_v], dim=-1)
        flat_h = grad_h.reshape(-1, grad_h.shape[-1])
        grad_w1 = flat_h.t() @ xc.reshape(-1, xc.shape[-1])
        grad_b1 = flat_h.sum(0) if ctx.has_bias[0] else None
        grad_x = grad_h @ w1.to(dtype)
        cast = lambda t, ref: None if t is None else t.to(ref.dtype)  # noqa: E731
        return (grad_x.to(ctx.x_dtype), grad_w1.to(w1.dtype), cast(grad_b1, w1), grad_w2.to(w2.dtype),
                cast(grad_b2, w2))


def swiglu_mlp(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_value: Tensor,
               b_value: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor]) -> Tensor:
    """x: (..., D) -> (..., D_out): ``w_out (silu(x w_gate^T + b_gate) * (x w_value^T + b_value))
    + b_out``, one projection for gate and value, their product recomputed in the backward.
    Weights as ``nn.Linear`` holds them: w_gate, w_value (H, D), w_out (D_out, H)."""
    w1 = torch.cat([w_gate, w_value], dim=0)  # (2H, D)
    b1 = None if b_gate is None else torch.cat([b_gate, b_value], dim=0)
    return _SwiGLU.apply(x, w1, b1, w_out, b_out)


__all__ = ["swiglu_mlp"]
