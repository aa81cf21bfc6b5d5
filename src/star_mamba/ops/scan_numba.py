"""Fused CPU selective scan compiled by numba: the state stays in registers, nothing of size
(batch, dim, L, N) is ever materialised.

Forward: one task per (batch, channel) runs the recurrence over L with the N states in a small
local array. Backward: one task per (batch, block of channels) recomputes that channel's states
into a per-task (L, N) buffer (it fits in cache), then runs the adjoint recurrence backwards.
B and C gradients are sums over channels, so each task writes its own partial sum and the
partials are reduced afterwards (no races, deterministic results).

Imported lazily by the dispatcher (``star_mamba.ops.scan``), which owns autograd and falls back
to the torch scan, with one warning, where numba cannot load.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

# Fast-math without "no NaN / no inf": NaNs from bad inputs must still reach the loss check.
_FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}


@njit(parallel=True, cache=True, fastmath=_FAST)
def _forward_kernel(u, delta, A, Bt, Ct, y, last):  # pragma: no cover - compiled
    # u, delta, y: (b, d, L); A: (d, N); Bt, Ct: (b, L, N); last: (b, d, N)
    nb, nd, L = u.shape
    N = A.shape[1]
    for job in prange(nb * nd):
        bi, di = job // nd, job % nd
        h = np.zeros(N, dtype=u.dtype)
        for t in range(L):
            dt = delta[bi, di, t]
            x = dt * u[bi, di, t]
            acc = 0.0
            for n in range(N):
                h[n] = math.exp(dt * A[di, n]) * h[n] + x * Bt[bi, t, n]
                acc += h[n] * Ct[bi, t, n]
            y[bi, di, t] = acc
        for n in range(N):
            last[bi, di, n] = h[n]


@njit(parallel=True, cache=True, fastmath=_FAST)
def _backward_kernel(u, delta, A, Bt, Ct, dy, dlast, du, ddelta, dA_part, dB_part, dC_part,
                     block):  # pragma: no cover - compiled
    # dA_part: (b, d, N); dB_part, dC_part: (blocks, b, L, N); partial sums reduced by the caller
    nb, nd, L = u.shape
    N = A.shape[1]
    nblocks = (nd + block - 1) // block
    for job in prange(nb * nblocks):
        bi, blk = job // nblocks, job % nblocks
        hs = np.empty((L, N), dtype=u.dtype)  # states of one channel
        decay = np.empty((L, N), dtype=u.dtype)  # exp(delta_t * A)
        g = np.empty(N, dtype=u.dtype)
        for di in range(blk * block, min(nd, (blk + 1) * block)):
            for n in range(N):
                g[n] = 0.0
            for t in range(L):  # recompute the forward states
                dt = delta[bi, di, t]
                x = dt * u[bi, di, t]
                for n in range(N):
                    a = math.exp(dt * A[di, n])
                    decay[t, n] = a
                    g[n] = a * g[n] + x * Bt[bi, t, n]
                    hs[t, n] = g[n]
            for n in range(N):
                g[n] = dlast[bi, di, n]
            for t in range(L - 1, -1, -1):  # adjoint: g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1}
                dt = delta[bi, di, t]
                ut = u[bi, di, t]
                dyt = dy[bi, di, t]
                s_delta = 0.0
                s_u = 0.0
                for n in range(N):
                    gn = g[n] + dyt * Ct[bi, t, n]
                    dC_part[blk, bi, t, n] += dyt * hs[t, n]
                    b = Bt[bi, t, n]
                    h_prev = hs[t - 1, n] if t > 0 else 0.0
                    gda = gn * h_prev * decay[t, n]  # gradient on delta_t * A
                    s_delta += gda * A[di, n] + gn * b * ut
                    dA_part[bi, di, n] += gda * dt
                    s_u += gn * b
                    dB_part[blk, bi, t, n] += gn * dt * ut
                    g[n] = gn * decay[t, n]
                ddelta[bi, di, t] = s_delta
                du[bi, di, t] = s_u * dt


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _keeping_torch_threads(fn, *args):
    """``fn(*args)``, leaving torch's thread count as it was. numba's OpenMP threading layer,
    when it starts (its first use in a process), sets the process's OpenMP thread count to
    numba's own, which torch reads too: run.threads=1 would silently become all cores for the
    rest of the first run in a process (and compute differently from a later run)."""
    threads = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


_keeping_torch_threads(numba.get_num_threads)  # start numba's threading layer now


def _launch(kernel, *args) -> None:
    """Run a parallel kernel on as many threads as torch uses."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _keeping_torch_threads(kernel, *args)


def saved_shape(batch: int, dim: int, length: int, d_state: int) -> tuple[int, ...]:
    """The backward recomputes the states: nothing is kept beyond the inputs."""
    return (0,)


def forward(u, delta, A, B, C):
    """u, delta (b, d, L); A (d, N); B, C (b, N, L), CPU float32/64 ->
    y (b, d, L), last state (b, d, N), an empty tensor (nothing saved)."""
    Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, L, N)
    y = torch.empty_like(u)
    last = u.new_empty(u.shape[0], u.shape[1], A.shape[1])
    _launch(_forward_kernel, _numpy(u), _numpy(delta), _numpy(A), Bt.numpy(), Ct.numpy(),
            y.numpy(), last.numpy())
    return y, last, u.new_empty(0)


def backward(u, delta, A, B, C, saved, dy, dlast):
    """Gradients of (y, last) -> (du, ddelta, dA, dB, dC), shaped as the inputs."""
    nb, nd, L = u.shape
    N = A.shape[1]
    Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (b, L, N)
    # enough blocks of channels to keep every thread busy, each small enough for the cache
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    block = max(1, nd // max(1, 2 * threads // max(nb, 1)))
    block = min(block, 64)
    nblocks = (nd + block - 1) // block
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA_part = u.new_zeros(nb, nd, N)
    dB_part = u.new_zeros(nblocks, nb, L, N)
    dC_part = u.new_zeros(nblocks, nb, L, N)
    _launch(_backward_kernel, _numpy(u), _numpy(delta), _numpy(A), Bt.numpy(), Ct.numpy(),
            _numpy(dy), _numpy(dlast), du.numpy(), ddelta.numpy(), dA_part.numpy(),
            dB_part.numpy(), dC_part.numpy(), block)
    dB = dB_part.sum(0).transpose(1, 2).contiguous()  # (b, N, L)
    dC = dC_part.sum(0).transpose(1, 2).contiguous()
    return du, ddelta, dA_part.sum(0), dB, dC
