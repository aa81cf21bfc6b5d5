"""Selective scan in Triton (ships with PyTorch's CUDA wheels): no nvcc, compiled on first use.

One program per (batch, block of BLOCK_D channels) keeps the (BLOCK_D, N) state in registers and
walks the sequence. The forward writes every state (float32) for the backward, which runs the
adjoint recurrence in reverse; B and C gradients (sums over channels) are accumulated with
atomics.

Status: correct in Triton's interpreter (``TRITON_INTERPRET=1``, exercised by the tests on CPU);
not yet run or timed on a GPU. ``selective_scan(backend="auto")`` falls back to the
pure-PyTorch scan, with one warning, if this kernel fails to compile or launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, y_ptr, hs_ptr, last_ptr,
                    DIM, L, N: tl.constexpr, BLOCK_D: tl.constexpr):
    # u, delta, y: (b, DIM, L); A: (DIM, N); B, C: (b, N, L); hs: (b, DIM, L, N); last: (b, DIM, N)
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    h = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    row = (pid_b * DIM + offs_d) * L  # (BLOCK_D,) start of each channel's sequence
    bc = pid_b * N * L + offs_n * L  # (N,)
    for t in range(L):
        dt = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0)
        x = tl.load(u_ptr + row + t, mask=mask_d, other=0.0)
        Bt = tl.load(B_ptr + bc + t)
        Ct = tl.load(C_ptr + bc + t)
        h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
        tl.store(hs_ptr + (row[:, None] + t) * N + offs_n[None, :], h, mask=mask_dn)
        tl.store(y_ptr + row + t, tl.sum(h * Ct[None, :], axis=1), mask=mask_d)
    tl.store(last_ptr + (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, hs_ptr, dy_ptr, dlast_ptr,
                     du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,
                     DIM, L, N: tl.constexpr, BLOCK_D: tl.constexpr):
    # dA: (b, DIM, N) per-batch partials; dB, dC: (b, N, L) float32, accumulated atomically
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, N)
    mask_d = offs_d < DIM
    mask_dn = mask_d[:, None]
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0)
    state = (pid_b * DIM + offs_d[:, None]) * N + offs_n[None, :]
    g = tl.load(dlast_ptr + state, mask=mask_dn, other=0.0)
    dA_acc = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    row = (pid_b * DIM + offs_d) * L
    bc = pid_b * N * L + offs_n * L
    for i in range(L):
        t = L - 1 - i
        dt = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0)
        x = tl.load(u_ptr + row + t, mask=mask_d, other=0.0)
        dyt = tl.load(dy_ptr + row + t, mask=mask_d, other=0.0)
        Bt = tl.load(B_ptr + bc + t)
        Ct = tl.load(C_ptr + bc + t)
        a = tl.exp(dt[:, None] * A)
        g = g + dyt[:, None] * Ct[None, :]  # gradient on h_t
        h_t = tl.load(hs_ptr + (row[:, None] + t) * N + offs_n[None, :], mask=mask_dn, other=0.0)
        h_prev = tl.load(hs_ptr + (row[:, None] + t - 1) * N + offs_n[None, :],
                         mask=mask_dn & (tl.full((BLOCK_D, 1), t, tl.int32) > 0), other=0.0)
        tl.atomic_add(dC_ptr + bc + t, tl.sum(dyt[:, None] * h_t, axis=0))
        gda = g * h_prev * a  # gradient on delta_t * A
        gB = tl.sum(g * Bt[None, :], axis=1)  # (BLOCK_D,)
        tl.store(ddelta_ptr + row + t, tl.sum(gda * A, axis=1) + gB * x, mask=mask_d)
        tl.store(du_ptr + row + t, gB * dt, mask=mask_d)
        tl.atomic_add(dB_ptr + bc + t, tl.sum(g * (dt * x)[:, None], axis=0))
        dA_acc += gda * dt[:, None]
        g = g * a
    tl.store(dA_ptr + state, dA_acc, mask=mask_dn)


BLOCK_D = 32


class TritonScanFn(torch.autograd.Function):
    """Core recurrence y_t = <C_t, h_t> in float32 (no D, z, bias or softplus)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        b, dim, L = u.shape
        N = A.shape[1]
        y = torch.empty_like(u)
        hs = u.new_empty(b, dim, L, N)
        last = u.new_empty(b, dim, N)
        grid = (b, triton.cdiv(dim, BLOCK_D))
        _forward_kernel[grid](u, delta, A, B, C, y, hs, last, dim, L, N=N, BLOCK_D=BLOCK_D)
        ctx.save_for_backward(u, delta, A, B, C, hs)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, hs = ctx.saved_tensors
        b, dim, L = u.shape
        N = A.shape[1]
        dy = dy.contiguous() if dy is not None else torch.zeros_like(u)
        dlast = dlast.contiguous() if dlast is not None else u.new_zeros(b, dim, N)
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dA = u.new_empty(b, dim, N)
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)
        grid = (b, triton.cdiv(dim, BLOCK_D))
        _backward_kernel[grid](u, delta, A, B, C, hs, dy, dlast, du, ddelta, dA, dB, dC,
                               dim, L, N=N, BLOCK_D=BLOCK_D)
        return du, ddelta, dA.sum(0), dB, dC
