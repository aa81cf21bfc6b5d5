"""The selective scan as a Python loop under autograd, line by line the recurrence: the ground
truth every other backend is tested against (slow; float64 in the tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _prepare_delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if softplus else delta


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every backend computes in float32 (float64 for float64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """u, delta, z (b, d, L); A (d, N); B, C (b, N, L); D, delta_bias (d,) ->
    y (b, d, L) in u's dtype [, last state (b, d, N)]."""
    dtype = u.dtype
    ct = compute_dtype(dtype)
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
        delta = _prepare_delta(delta, None if delta_bias is None else delta_bias.to(ct),
                               delta_softplus)
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, N)
        ys = []
        for t in range(u.shape[2]):
            dt = delta[:, :, t, None]  # (b, d, 1)
            h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]  # (b, d, N)
            ys.append((h * C[:, None, :, t]).sum(-1))  # (b, d)
        y = torch.stack(ys, dim=-1)  # (b, d, L)
        y = _finish(y, u, None if D is None else D.to(ct), None if z is None else z.to(ct))
    return (y.to(dtype), h.to(dtype)) if return_last_state else y.to(dtype)
