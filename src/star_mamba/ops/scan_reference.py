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


def per_group(t: Tensor, groups: int, batch: int, dim: int, length: int) -> Tensor:
    """B or C in any of its forms -> (batch, groups, N, L), what each of ``groups`` groups of
    dim / groups adjacent channels reads. (batch, N, L) is shared by every channel, (batch, G, N, L)
    by each of G groups, (dim, N) is constant over batch and time (then groups = dim); ``groups``
    is a multiple of the form's own."""
    if t.ndim == 2:
        return t[None, :, :, None].expand(batch, dim, t.shape[1], length)
    if t.ndim == 3:
        t = t[:, None]
    return t.repeat_interleave(groups // t.shape[1], dim=1)


def scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """u, delta, z (b, d, L); A (d, N); B, C (b, N, L), (b, G, N, L) or (d, N); D, delta_bias
    (d,) -> y (b, d, L) in u's dtype [, last state (b, d, N) in the compute dtype]."""
    dtype = u.dtype
    ct = compute_dtype(dtype)
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
        delta = _prepare_delta(delta, None if delta_bias is None else delta_bias.to(ct),
                               delta_softplus)
        B, C = (per_group(t, u.shape[1], *u.shape) for t in (B, C))  # (b, d, N, L): per channel
        h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, N)
        ys = []
        for t in range(u.shape[2]):
            dt = delta[:, :, t, None]  # (b, d, 1)
            h = torch.exp(dt * A) * h + dt * B[..., t] * u[:, :, t, None]  # (b, d, N)
            ys.append((h * C[..., t]).sum(-1))  # (b, d)
        y = torch.stack(ys, dim=-1)  # (b, d, L)
        y = _finish(y, u, None if D is None else D.to(ct), None if z is None else z.to(ct))
    return (y.to(dtype), h) if return_last_state else y.to(dtype)
