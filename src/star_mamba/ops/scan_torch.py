"""Selective scan in plain PyTorch with a hand-written reverse-scan backward; runs on any device.

Core recurrence only (the dispatcher adds bias, softplus, D and the z gate):

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = <C_t, h_t>

Everything is laid out time-major, (L, b, d, N), so that the bulk products are contiguous and
each step of the loop touches one contiguous slab with one fused multiply-add. The forward keeps
every state ``hs`` for the backward (this is the memory-hungry backend: b x d x L x N floats per
call; the fused numba and Triton kernels keep none or one per chunk). The backward recomputes
exp(delta A) rather than keeping it, and runs the adjoint recurrence
g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1}. Timings: ``star-mamba bench``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def saved_shape(batch: int, dim: int, length: int, d_state: int) -> tuple[int, ...]:
    """Shape of the tensor :func:`forward` keeps for the backward: every state, time-major."""
    return (length, batch, dim, d_state)


def forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
    """u, delta (b, d, L); A (d, N); B, C (b, N, L), one float dtype ->
    y (b, d, L), last state (b, d, N), states hs (L, b, d, N)."""
    dT = delta.permute(2, 0, 1).contiguous()  # (L, b, d)
    uT = u.permute(2, 0, 1).contiguous()  # (L, b, d)
    BT = B.permute(2, 0, 1).contiguous()  # (L, b, N)
    CT = C.permute(2, 0, 1).contiguous()  # (L, b, N)
    dA = torch.exp_(dT.unsqueeze(-1) * A)  # (L, b, d, N)
    hs = (dT * uT).unsqueeze(-1) * BT.unsqueeze(2)  # (L, b, d, N): dBu, overwritten by states
    for t in range(1, hs.shape[0]):
        torch.addcmul(hs[t], dA[t], hs[t - 1], out=hs[t])  # h_t = dA_t h_{t-1} + dBu_t
    y = torch.matmul(hs, CT.unsqueeze(-1)).squeeze(-1)  # (L, b, d)
    return y.permute(1, 2, 0).contiguous(), hs[-1].clone(), hs


def backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, hs: Tensor, dy: Tensor,
             dlast: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (y, last) -> (du, ddelta, dA, dB, dC), shaped as the inputs."""
    # time-major copies: the bulk products below are 2-3x slower on strided views
    dT, uT, BT, CT, dyT = (t.permute(2, 0, 1).contiguous() for t in (delta, u, B, C, dy))
    dA = torch.exp_(dT.unsqueeze(-1) * A)  # (L, b, d, N), recomputed
    g = dyT.unsqueeze(-1) * CT.unsqueeze(2)  # (L, b, d, N): direct gradient on h_t
    g[-1] += dlast
    for t in range(g.shape[0] - 2, -1, -1):
        torch.addcmul(g[t], dA[t + 1], g[t + 1], out=g[t])  # adjoint recurrence
    dC = torch.matmul(dyT.unsqueeze(-2), hs).squeeze(-2)  # (L, b, N)
    d_dtA = dA.mul_(g)  # gradient on delta_t * A is g_t * h_{t-1} * dA_t, (L, b, d, N)
    d_dtA[1:] *= hs[:-1]
    d_dtA[0] = 0  # h_{-1} = 0
    gB = torch.matmul(g, BT.unsqueeze(-1)).squeeze(-1)  # sum_n g_t B_t, (L, b, d)
    ddelta = (d_dtA * A).sum(-1) + gB * uT  # (L, b, d)
    dA_param = (d_dtA * dT.unsqueeze(-1)).sum((0, 1))  # (d, N); einsum is 10x slower here
    dB = torch.matmul((dT * uT).unsqueeze(-2), g).squeeze(-2)  # sum_d g_t dt_t u_t, (L, b, N)
    du = gB * dT  # (L, b, d)
    back = lambda x: x.permute(1, 2, 0).contiguous()  # noqa: E731  (L, b, X) -> (b, X, L)
    return back(du), back(ddelta), dA_param, back(dB), back(dC)
