"""Selective scan in Triton ("Triton scan v3"): the whole Mamba scan fused, forward and backward.

    dt_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = 0
    y_t  = (<C_t, h_t> + D * u_t) * silu(z_t)         (D and the z gate optional)

Three functions make the interface: ``saved_shape``, ``forward`` and ``backward`` (the caller,
ops/scan.py, owns autograd and the fallback to the torch kernel).

Work split. One program = one warp = (batch, block of BLOCK_D = 32 channels). The sequence is
walked in loop iterations of STEPS (forward) or SUB (backward) steps, unrolled: the inputs of
those steps are loaded first (one load latency per iteration, not per step), then consumed one
step at a time. A (BLOCK_D,) slice of u, delta, z or dy is read according to the tensor's own
strides (any strides, no copies): with time stride 1 (channel-major) as one (BLOCK_D, steps)
tile, each lane reading its channel's steps as one vector; otherwise one load per step, coalesced
when the channel stride is 1 (time-major, e.g. a transposed view of a (b, L, D) matmul output).
Stores (y, du, ddelta, dz) follow the same rule; y is returned time-major.

Register layouts (chosen by Triton from the memory accesses; see the comment above the kernels):
the forward keeps a channel per lane and its NP states in that lane's registers (the sum over
states for y never leaves the thread); the backward gives each lane 4 channels x 4 states, which
balances its two sums over states (gradients of u and delta) against its two sums over the
block's channels (dB, dC) done with warp shuffles every step.

Memory (b = batch, D = dim, L = length, N = d_state, NP = next power of two >= N, DP = D rounded
up to 32, n_chunks = cdiv(L, CHUNK)); nothing of size b*D*L*N exists anywhere:

* forward saves ``checkpoints`` (b, n_chunks, NP, DP) float32: the state entering each chunk of
  CHUNK = 64 steps (zero padded);
* backward walks the chunks last to first. Per chunk it recomputes the states once from the
  checkpoint, writing the state entering each sub-chunk of SUB = 2 steps to a scratch
  (b, CHUNK / SUB, NP, DP) float32; then per sub-chunk, last to first, it recomputes the SUB
  states into registers and runs the adjoint g_t = dyc_t C_t + exp(dt_{t+1} A) g_{t+1} back
  through them. Sums over channels (dB, dC) are written as per-block partials
  (cdiv(D, 32), b, L, NP), sums over batch and time (dA, dD, ddelta_bias) as per-batch
  partials; ``torch.sum`` adds them up in a fixed order (deterministic, no atomics).

Inputs u, delta, z, B, C may be float32, bfloat16 or float16 (each its own); A, D, delta_bias are
float32. Loads upcast to float32 and all arithmetic is float32 (exp2, with A pre-scaled by
log2 e); y, du, ddelta, dz, dB, dC come back in the dtype of u, u, delta, z, B, C; last, dA, dD
and ddelta_bias are float32. Offsets are 64-bit where they can exceed 2**31 (batch, channel and
time offsets are int64 before any multiplication by a stride); sizes that large are not tested.

Against v2 (one program per 32 channels on 4 warps, a state's 16 entries on 16 lanes): v2 paid
a cross-lane reduction and a dependent global load latency every step, read channel-major
tensors one sector per channel per step, kept every backward state in a global scratch, and left
bias, softplus, D and the gate (and float32 copies of every input) to separate PyTorch passes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

CHUNK: int = 64  # steps between the forward's checkpoints
BLOCK_D: int = 32  # channels per program: one warp, a channel per lane
STEPS: int = 8  # forward steps per loop iteration (unrolled; inputs loaded ahead)
SUB: int = 2  # backward sub-chunk: its states are recomputed into registers
NUM_WARPS: int = 1  # one warp per program: the sums over channels stay within a warp
BWD_MAXNREG: int = 168  # backward register cap when programs queue up: 12 warps per SM
BWD_FULL_REGS_PER_SM: int = 8  # backward programs per SM that fit without the cap

LOG2E = 1.4426950408889634  # A is passed as A log2(e): exp(dt A) = exp2(dt A log2(e))
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _softplus_sigmoid(r):
    """softplus(r) = max(r, 0) + log1p(exp(-|r|)) and its derivative sigmoid(r), accurate where
    exp(-|r|) is below float32's epsilon (log1p by the (w - 1) correction)."""
    e = tl.exp(-tl.abs(r))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    sig = tl.where(r >= 0, 1.0 / w, e / w)
    return tl.maximum(r, 0.0) + log1p_e, sig


@triton.jit
def _load_steps(base, s_l, t0, L, mask_d, kidx, STEPS: tl.constexpr, TILE: tl.constexpr):
    """Steps t0 .. t0+STEPS-1 of a (BLOCK_D,) channel slice; base: (BLOCK_D,) pointers at t = 0.

    TILE (time stride 1): one (BLOCK_D, STEPS) float32 tile, zero past L. Otherwise a tuple of
    STEPS (BLOCK_D,) float32 vectors, each loaded at min(t, L - 1) (the caller masks t >= L)."""
    if TILE:
        t = t0 + kidx  # (STEPS,)
        vals = tl.load(base[:, None] + t[None, :], mask=mask_d[:, None] & (t < L)[None, :],
                       other=0.0).to(tl.float32)
    else:
        vals = ()
        for k in tl.static_range(STEPS):
            t = tl.minimum(t0 + k, L - 1).to(tl.int64)
            vals = vals + (tl.load(base + t * s_l, mask=mask_d, other=0.0).to(tl.float32),)
    return vals


@triton.jit
def _pick(vals, k: tl.constexpr, kidx, TILE: tl.constexpr):
    """Step k of what _load_steps returned, (BLOCK_D,). For a tile the masked sum folds, at
    compile time, into a register read: k is a constant and -0.0 is the identity of +."""
    if TILE:
        v = tl.sum(tl.where(kidx[None, :] == k, vals, -0.0), axis=1)
    else:
        v = vals[k]
    return v


@triton.jit
def _put(acc, val, k: tl.constexpr, kidx, base, s_l, t, L, mask_d, TILE: tl.constexpr):
    """Write step k (time t) of a (BLOCK_D,) result: into the (BLOCK_D, STEPS) tile ``acc`` that
    _flush stores (TILE), or straight to memory."""
    if TILE:
        acc = tl.where(kidx[None, :] == k, val[:, None], acc)
    else:
        tl.store(base + t.to(tl.int64) * s_l, val.to(base.dtype.element_ty),
                 mask=mask_d & (t < L))
    return acc


@triton.jit
def _flush(acc, base, t0, L, mask_d, kidx, TILE: tl.constexpr):
    if TILE:
        t = t0 + kidx
        tl.store(base[:, None] + t[None, :], acc.to(base.dtype.element_ty),
                 mask=mask_d[:, None] & (t < L)[None, :])


@triton.jit
def _delta(r, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Raw delta (BLOCK_D,) -> (dt, d dt / d raw delta)."""
    if HAS_BIAS:
        r = r + bias
    if SOFTPLUS:
        dt, ddt_dr = _softplus_sigmoid(r)
    else:
        dt = r
        ddt_dr = tl.full(r.shape, 1.0, tl.float32)
    return dt, ddt_dr


# ----------------------------------------------------------------------------- kernels
#
# Pointer bookkeeping keeps registers free: 64-bit scalars for batch / block / time offsets,
# 32-bit per-element offsets (NP * DP < 2**31), added at each use.
#
# The register layout of the (NP, BLOCK_D) state follows from how the (NP, DP) "planes" (A,
# checkpoints, scratch, last, dlast, dA; row stride DP, always a multiple of 32) are accessed:
# * forward: DP is not specialised on its divisibility (do_not_specialize), so those accesses are
#   not vectorised and Triton puts the 32 channels on the 32 lanes with the NP states of a
#   channel in its lane's registers (no shuffles at all);
# * backward: DP is specialised, the accesses are 128-bit vectors of 4 channels, and the layout
#   becomes 4 channels x 4 states per lane (8 lanes across channels, 4 across states): each sum,
#   over states or over channels, is then mostly within a thread (see the module docstring).

@triton.jit
def _plane(base, offs_n, offs_c, DP):
    """(NP, BLOCK_D) pointers into an (NP, DP) float32 plane; base includes the block's first
    channel."""
    return base + (offs_n[:, None] * DP + offs_c[None, :])


@triton.jit(do_not_specialize=["DP"])
def _forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                    y_ptr, last_ptr, ckpt_ptr,
                    DIM, L, N_CHUNKS, DP,
                    su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l, sy_b, sy_d, sy_l,
                    NP: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                    STEPS: tl.constexpr, U_TILE: tl.constexpr, DELTA_TILE: tl.constexpr,
                    Z_TILE: tl.constexpr, Y_TILE: tl.constexpr, HAS_D: tl.constexpr,
                    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    # u, delta, z, y: (b, DIM, L), any strides (s*_b, s*_d, s*_l); B, C: (b, L, NP) f32;
    # D, bias: (DIM,) f32; planes, f32: A (NP, DP) = A^T log2(e); last (b, NP, DP);
    # ckpt (b, N_CHUNKS, NP, DP).
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D  # the block's first channel
    offs_c = tl.arange(0, BLOCK_D)  # (BLOCK_D,) channel within the block
    offs_n = tl.arange(0, NP)  # (NP,)
    kidx = tl.arange(0, STEPS)  # (STEPS,)
    mask_d = d0 + offs_c < DIM
    A = tl.load(_plane(A_ptr + d0, offs_n, offs_c, DP))  # (NP, BLOCK_D)
    Dv = tl.load(D_ptr + d0 + offs_c, mask=mask_d, other=0.0) if HAS_D else None  # (BLOCK_D,)
    bias = tl.load(bias_ptr + d0 + offs_c, mask=mask_d, other=0.0) if HAS_BIAS else None
    u_base = u_ptr + pid_b * su_b + (d0 + offs_c) * su_d  # (BLOCK_D,) pointers at t = 0
    d_base = delta_ptr + pid_b * sd_b + (d0 + offs_c) * sd_d
    z_base = z_ptr + pid_b * sz_b + (d0 + offs_c) * sz_d
    y_base = y_ptr + pid_b * sy_b + (d0 + offs_c) * sy_d
    h = tl.zeros((NP, BLOCK_D), dtype=tl.float32)  # h[n, channel]
    for c in range(N_CHUNKS):
        tl.store(_plane(ckpt_ptr + (pid_b * N_CHUNKS + c) * NP * DP + d0, offs_n, offs_c, DP), h)
        for t0 in range(c * CHUNK, tl.minimum(L, c * CHUNK + CHUNK), STEPS):
            xs = _load_steps(u_base, su_l, t0, L, mask_d, kidx, STEPS, U_TILE)
            rs = _load_steps(d_base, sd_l, t0, L, mask_d, kidx, STEPS, DELTA_TILE)
            zs = _load_steps(z_base, sz_l, t0, L, mask_d, kidx, STEPS, Z_TILE) if HAS_Z else None
            ys = tl.zeros((BLOCK_D, STEPS), dtype=tl.float32)  # (BLOCK_D, STEPS), Y_TILE only
            for k in tl.static_range(STEPS):
                t = t0 + k
                valid = t < L  # past the end: dt = x = 0 leaves h unchanged
                row = (pid_b * L + tl.minimum(t, L - 1)) * NP  # int64 scalar
                Bt = tl.load(B_ptr + row + offs_n)  # (NP,)
                Ct = tl.load(C_ptr + row + offs_n)  # (NP,)
                x = tl.where(valid, _pick(xs, k, kidx, U_TILE), 0.0)  # (BLOCK_D,)
                dt, _unused = _delta(_pick(rs, k, kidx, DELTA_TILE), bias, HAS_BIAS, SOFTPLUS)
                dt = tl.where(valid, dt, 0.0)
                h = tl.exp2(A * dt[None, :]) * h + Bt[:, None] * (dt * x)[None, :]
                y = tl.sum(h * Ct[:, None], axis=0)  # (BLOCK_D,), within each thread
                if HAS_D:
                    y += Dv * x
                if HAS_Z:
                    zt = _pick(zs, k, kidx, Z_TILE)
                    y = y * zt * tl.sigmoid(zt)
                ys = _put(ys, y, k, kidx, y_base, sy_l, t, L, mask_d, Y_TILE)
            _flush(ys, y_base, t0, L, mask_d, kidx, Y_TILE)
    tl.store(_plane(last_ptr + pid_b * NP * DP + d0, offs_n, offs_c, DP), h)


@triton.jit
def _backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                     ckpt_ptr, dy_ptr, dlast_ptr, sub_ptr,
                     du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
                     BATCH, DIM, L, N_CHUNKS, DP,
                     su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l,
                     sg_b, sg_d, sg_l, sdu_b, sdu_d, sdu_l, sdd_b, sdd_d, sdd_l,
                     sdz_b, sdz_d, sdz_l,
                     NP: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                     SUB: tl.constexpr, U_TILE: tl.constexpr, DELTA_TILE: tl.constexpr,
                     Z_TILE: tl.constexpr, DY_TILE: tl.constexpr, DU_TILE: tl.constexpr,
                     DDELTA_TILE: tl.constexpr, DZ_TILE: tl.constexpr, HAS_D: tl.constexpr,
                     HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    # inputs as in the forward; dy: (b, DIM, L), strides sg_*; du, ddelta, dz: (b, DIM, L),
    # strides sdu_*, sdd_*, sdz_*; planes, f32: dlast (b, NP, DP); scratch sub
    # (b, CHUNK // SUB, NP, DP), slot j = the state entering sub-chunk j of the current chunk.
    # Partials, f32: dA (b, NP, DP); dB, dC (cdiv(DIM, BLOCK_D), b, L, NP); dD, dbias (b, DP).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    d0 = pid_d * BLOCK_D  # the block's first channel
    offs_c = tl.arange(0, BLOCK_D)  # (BLOCK_D,) channel within the block
    offs_n = tl.arange(0, NP)  # (NP,)
    kidx = tl.arange(0, SUB)  # (SUB,)
    mask_d = d0 + offs_c < DIM
    A = tl.load(_plane(A_ptr + d0, offs_n, offs_c, DP))  # (NP, BLOCK_D), A log2(e)
    Dv = tl.load(D_ptr + d0 + offs_c, mask=mask_d, other=0.0) if HAS_D else None
    bias = tl.load(bias_ptr + d0 + offs_c, mask=mask_d, other=0.0) if HAS_BIAS else None
    u_base = u_ptr + pid_b * su_b + (d0 + offs_c) * su_d  # (BLOCK_D,) pointers at t = 0
    d_base = delta_ptr + pid_b * sd_b + (d0 + offs_c) * sd_d
    z_base = z_ptr + pid_b * sz_b + (d0 + offs_c) * sz_d
    g_base = dy_ptr + pid_b * sg_b + (d0 + offs_c) * sg_d
    du_base = du_ptr + pid_b * sdu_b + (d0 + offs_c) * sdu_d
    dd_base = ddelta_ptr + pid_b * sdd_b + (d0 + offs_c) * sdd_d
    dz_base = dz_ptr + pid_b * sdz_b + (d0 + offs_c) * sdz_d
    part = (pid_d * BATCH + pid_b) * L  # row of t = 0 in the dB, dC partials
    sub = sub_ptr + pid_b * (CHUNK // SUB) * NP * DP + d0  # + slot * NP * DP

    g = tl.load(_plane(dlast_ptr + pid_b * NP * DP + d0, offs_n, offs_c, DP))  # gradient on h
    dA_acc = tl.zeros((NP, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(N_CHUNKS):
        c = N_CHUNKS - 1 - i
        c_end = tl.minimum(L, c * CHUNK + CHUNK)
        n_sub = tl.cdiv(c_end - c * CHUNK, SUB)
        # 1) recompute the chunk from its checkpoint; keep the state entering each sub-chunk
        h = tl.load(_plane(ckpt_ptr + (pid_b * N_CHUNKS + c) * NP * DP + d0, offs_n, offs_c, DP))
        for j in range(n_sub):
            t0 = c * CHUNK + j * SUB
            tl.store(_plane(sub + j * NP * DP, offs_n, offs_c, DP), h)
            xs = _load_steps(u_base, su_l, t0, L, mask_d, kidx, SUB, U_TILE)
            rs = _load_steps(d_base, sd_l, t0, L, mask_d, kidx, SUB, DELTA_TILE)
            for k in tl.static_range(SUB):
                t = t0 + k
                valid = t < L
                Bt = tl.load(B_ptr + (pid_b * L + tl.minimum(t, L - 1)) * NP + offs_n)
                x = tl.where(valid, _pick(xs, k, kidx, U_TILE), 0.0)
                dt, _unused = _delta(_pick(rs, k, kidx, DELTA_TILE), bias, HAS_BIAS, SOFTPLUS)
                dt = tl.where(valid, dt, 0.0)
                h = tl.exp2(A * dt[None, :]) * h + Bt[:, None] * (dt * x)[None, :]
        tl.debug_barrier()  # the scratch written above is read below
        # 2) sub-chunks last to first: states into registers, then the adjoint back through them
        for jj in range(n_sub):
            j = n_sub - 1 - jj
            t0 = c * CHUNK + j * SUB
            h = tl.load(_plane(sub + j * NP * DP, offs_n, offs_c, DP))
            xs = _load_steps(u_base, su_l, t0, L, mask_d, kidx, SUB, U_TILE)
            rs = _load_steps(d_base, sd_l, t0, L, mask_d, kidx, SUB, DELTA_TILE)
            hs = ()  # hs[k] = h_{t-1}, the state entering step k
            dts = ()
            dsig = ()  # d dt / d raw delta
            for k in tl.static_range(SUB):
                t = t0 + k
                valid = t < L
                Bt = tl.load(B_ptr + (pid_b * L + tl.minimum(t, L - 1)) * NP + offs_n)
                x = tl.where(valid, _pick(xs, k, kidx, U_TILE), 0.0)
                dt, ddt_dr = _delta(_pick(rs, k, kidx, DELTA_TILE), bias, HAS_BIAS, SOFTPLUS)
                dt = tl.where(valid, dt, 0.0)
                hs = hs + (h,)
                dts = dts + (dt,)
                dsig = dsig + (ddt_dr,)
                h = tl.exp2(A * dt[None, :]) * h + Bt[:, None] * (dt * x)[None, :]
            gs = _load_steps(g_base, sg_l, t0, L, mask_d, kidx, SUB, DY_TILE)
            zs = _load_steps(z_base, sz_l, t0, L, mask_d, kidx, SUB, Z_TILE) if HAS_Z else None
            du_t = tl.zeros((BLOCK_D, SUB), dtype=tl.float32)  # (BLOCK_D, SUB) tiles to store
            dd_t = tl.zeros((BLOCK_D, SUB), dtype=tl.float32)
            dz_t = tl.zeros((BLOCK_D, SUB), dtype=tl.float32)
            for k in tl.static_range(SUB - 1, -1, -1):
                t = t0 + k
                valid = t < L
                row = tl.minimum(t, L - 1)
                Bt = tl.load(B_ptr + (pid_b * L + row) * NP + offs_n)  # (NP,)
                Ct = tl.load(C_ptr + (pid_b * L + row) * NP + offs_n)  # (NP,)
                x = tl.where(valid, _pick(xs, k, kidx, U_TILE), 0.0)  # (BLOCK_D,)
                dt = dts[k]
                dy = tl.where(valid, _pick(gs, k, kidx, DY_TILE), 0.0)
                if HAS_Z:  # y = (yc + D u) silu(z): dyc = dy silu(z) is the gradient on yc
                    zt = _pick(zs, k, kidx, Z_TILE)
                    sz = tl.sigmoid(zt)
                    yp = tl.sum(h * Ct[:, None], axis=0)  # (BLOCK_D,) yc_t, h = h_t here
                    if HAS_D:
                        yp += Dv * x
                    dz_t = _put(dz_t, dy * yp * sz * (1.0 + zt * (1.0 - sz)), k, kidx, dz_base,
                                sdz_l, t, L, mask_d, DZ_TILE)
                    dyc = dy * zt * sz
                else:
                    dyc = dy
                g = g + Ct[:, None] * dyc[None, :]  # total gradient on h_t
                ga = g * tl.exp2(A * dt[None, :])  # (NP, BLOCK_D) carried to h_{t-1}
                gda = ga * hs[k]  # gradient on dt_t * A
                dA_acc += gda * dt[None, :]
                gB = tl.sum(g * Bt[:, None], axis=0)  # (BLOCK_D,) gradient on dt_t * u_t
                ddt = tl.sum(gda * A, axis=0) * _LN2 + gB * x  # A here is A log2(e)
                du = gB * dt
                if HAS_D:
                    du += dyc * Dv
                    dD_acc += dyc * x
                dr = tl.where(valid, ddt * dsig[k], 0.0)  # gradient on the raw delta
                if HAS_BIAS:
                    dbias_acc += dr
                du_t = _put(du_t, du, k, kidx, du_base, sdu_l, t, L, mask_d, DU_TILE)
                dd_t = _put(dd_t, dr, k, kidx, dd_base, sdd_l, t, L, mask_d, DDELTA_TILE)
                # sums over the block's channels: across the warp
                prow = (part + row) * NP
                tl.store(dB_ptr + prow + offs_n, tl.sum(g * (dt * x)[None, :], axis=1), mask=valid)
                tl.store(dC_ptr + prow + offs_n, tl.sum(h * dyc[None, :], axis=1), mask=valid)
                g = ga
                h = hs[k]
            _flush(du_t, du_base, t0, L, mask_d, kidx, DU_TILE)
            _flush(dd_t, dd_base, t0, L, mask_d, kidx, DDELTA_TILE)
            if HAS_Z:
                _flush(dz_t, dz_base, t0, L, mask_d, kidx, DZ_TILE)
        tl.debug_barrier()  # the next chunk overwrites the scratch read above
    tl.store(_plane(dA_ptr + pid_b * NP * DP + d0, offs_n, offs_c, DP), dA_acc)
    tl.store(dD_ptr + pid_b * DP + d0 + offs_c, dD_acc)
    tl.store(dbias_ptr + pid_b * DP + d0 + offs_c, dbias_acc)


# ----------------------------------------------------------------------------- host side

def _geometry(dim: int, length: int, d_state: int, chunk: int) -> tuple[int, int, int]:
    """-> (NP, DP, n_chunks): d_state padded to a power of two, dim padded to BLOCK_D, number of
    chunks."""
    return (triton.next_power_of_2(d_state), triton.cdiv(dim, BLOCK_D) * BLOCK_D,
            triton.cdiv(length, chunk))


def saved_shape(batch: int, dim: int, length: int, d_state: int, chunk: int = CHUNK
                ) -> tuple[int, ...]:
    """Shape of the checkpoints tensor forward() returns: (batch, cdiv(length, chunk), NP, DP),
    NP = next power of two >= d_state, DP = dim rounded up to 32 (zero padded)."""
    NP, DP, n_chunks = _geometry(dim, length, d_state, chunk)
    return (batch, n_chunks, NP, DP)


def checkpoints_from_states(hs: Tensor, chunk: int = CHUNK) -> Tensor:
    """Every state (L, b, d, N), as the torch kernel keeps them -> the checkpoints forward()
    saves: the state entering each chunk (zeros for the first), in saved_shape."""
    L, b, dim, N = hs.shape
    entering = torch.cat([torch.zeros_like(hs[:1]), hs[chunk - 1:L - 1:chunk]])  # (chunks, b, d, N)
    NP, DP, _ = _geometry(dim, L, N, chunk)
    return F.pad(entering.permute(1, 0, 3, 2).float(), (0, DP - dim, 0, NP - N)).contiguous()


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_params(chunk: int, name: str, steps: int) -> None:
    """steps: the forward's STEPS or the backward's SUB, a power of two dividing chunk."""
    if steps < 1 or steps & (steps - 1):
        raise ValueError(f"{name} must be a power of two, got {steps}")
    if chunk < 1 or chunk % steps:
        raise ValueError(f"chunk must be a positive multiple of {name} ({steps}), got {chunk}")


def _backward_options(device: torch.device, programs: int) -> dict:
    """Launch options of the backward. Unconstrained, it takes ~240 registers per thread: 8
    one-warp programs per SM. When more programs than that wait, cap the registers so that 12
    fit (65536 / (12 * 32) -> 168: a few spills, fewer waves)."""
    options = dict(num_warps=NUM_WARPS)
    if device.type == "cuda" and programs > BWD_FULL_REGS_PER_SM * _sm_count(device):
        options["maxnreg"] = BWD_MAXNREG
    return options


def _strides(t: Tensor) -> tuple[int, int, int]:
    return tuple(t.stride())  # (batch, channel, time)


def _tile(t: Tensor) -> bool:
    """Read / write (BLOCK_D, steps) tiles: each channel's steps are contiguous and every row
    starts 16-byte aligned as far as the JIT can tell (it specialises integers divisible by 16
    and pointers aligned to 16 bytes), so that a lane's steps are one vector access. Otherwise
    one access per step."""
    b_stride, d_stride, l_stride = t.stride()
    return (l_stride == 1 and t.shape[2] > 1 and t.data_ptr() % 16 == 0
            and all(s % 16 == 0 or n == 1 for s, n in ((b_stride, t.shape[0]),
                                                      (d_stride, t.shape[1]))))


def _prepare(A: Tensor, B: Tensor, C: Tensor, NP: int, DP: int) -> tuple[Tensor, Tensor, Tensor]:
    """A (dim, N) -> (NP, DP) f32 = A^T log2(e), zero padded; B, C (b, N, L) -> (b, L, NP) f32."""
    dim, N = A.shape
    A2 = F.pad(A.t().float() * LOG2E, (0, DP - dim, 0, NP - N)).contiguous()
    B2, C2 = (F.pad(x.transpose(1, 2).float(), (0, NP - N)).contiguous() for x in (B, C))
    return A2, B2, C2


def _vector(t: Optional[Tensor], dummy: Tensor) -> Tensor:
    return dummy if t is None else t.float().contiguous()


def forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
            D: Optional[Tensor] = None, z: Optional[Tensor] = None,
            delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
            chunk: int = CHUNK, steps: int = STEPS) -> tuple[Tensor, Tensor, Tensor]:
    """u, delta, z (b, dim, L); A (dim, N); B, C (b, N, L); D, delta_bias (dim,); any strides ->
    y (b, dim, L) in u's dtype, stored time-major (strides (L*dim, 1, dim)), last (b, dim, N)
    float32, checkpoints (saved_shape) float32."""
    _check_params(chunk, "steps", steps)
    b, dim, L = u.shape
    N = A.shape[1]
    NP, DP, n_chunks = _geometry(dim, L, N, chunk)
    A2, B2, C2 = _prepare(A, B, C, NP, DP)
    f32 = dict(dtype=torch.float32, device=u.device)
    y = torch.empty_strided((b, dim, L), (L * dim, 1, dim), dtype=u.dtype, device=u.device)
    last = torch.empty(b, NP, DP, **f32)
    checkpoints = torch.empty(saved_shape(b, dim, L, N, chunk), **f32)
    zz = u if z is None else z
    _forward_kernel[(b, triton.cdiv(dim, BLOCK_D))](
        u, delta, A2, B2, C2, _vector(D, A2), zz, _vector(delta_bias, A2), y, last, checkpoints,
        dim, L, n_chunks, DP, *_strides(u), *_strides(delta), *_strides(zz), *_strides(y),
        NP=NP, BLOCK_D=BLOCK_D, CHUNK=chunk, STEPS=steps,
        U_TILE=_tile(u), DELTA_TILE=_tile(delta), Z_TILE=_tile(zz), Y_TILE=_tile(y),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), num_warps=NUM_WARPS)
    return y, last[:, :N, :dim].transpose(1, 2).contiguous(), checkpoints


def backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, checkpoints: Tensor,
             dy: Tensor, dlast: Optional[Tensor] = None, D: Optional[Tensor] = None,
             z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
             delta_softplus: bool = False, chunk: int = CHUNK, sub: int = SUB
             ) -> tuple[Optional[Tensor], ...]:
    """Gradients of (y, last) -> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias (None for an absent
    input). dy (b, dim, L) any strides and dtype; dlast (b, dim, N) or None (zero). Gradients
    of u, delta, z, B, C have their input's dtype and strides (torch.empty_like); dA, dD and
    ddelta_bias are float32."""
    _check_params(chunk, "sub", sub)
    b, dim, L = u.shape
    N = A.shape[1]
    NP, DP, n_chunks = _geometry(dim, L, N, chunk)
    if tuple(checkpoints.shape) != saved_shape(b, dim, L, N, chunk):
        raise ValueError(f"checkpoints must have shape {saved_shape(b, dim, L, N, chunk)} "
                         f"(same chunk as the forward), got {tuple(checkpoints.shape)}")
    n_dblocks = triton.cdiv(dim, BLOCK_D)
    A2, B2, C2 = _prepare(A, B, C, NP, DP)
    f32 = dict(dtype=torch.float32, device=u.device)
    dlast = (torch.zeros(b, NP, DP, **f32) if dlast is None else  # (b, dim, N) -> (b, NP, DP)
             F.pad(dlast.float().transpose(1, 2), (0, DP - dim, 0, NP - N)).contiguous())
    scratch = torch.empty(b, chunk // sub, NP, DP, **f32)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = None if z is None else torch.empty_like(z)
    dA = torch.empty(b, NP, DP, **f32)  # per-batch partials
    dB = torch.empty(n_dblocks, b, L, NP, **f32)  # per-channel-block partials
    dC = torch.empty(n_dblocks, b, L, NP, **f32)
    dD, dbias = torch.empty(b, DP, **f32), torch.empty(b, DP, **f32)
    zz, dzz = (u, du) if z is None else (z, dz)
    _backward_kernel[(b, n_dblocks)](
        u, delta, A2, B2, C2, _vector(D, A2), zz, _vector(delta_bias, A2),
        checkpoints.contiguous(), dy, dlast, scratch,
        du, ddelta, dzz, dA, dB, dC, dD, dbias,
        b, dim, L, n_chunks, DP, *_strides(u), *_strides(delta), *_strides(zz), *_strides(dy),
        *_strides(du), *_strides(ddelta), *_strides(dzz),
        NP=NP, BLOCK_D=BLOCK_D, CHUNK=chunk, SUB=sub,
        U_TILE=_tile(u), DELTA_TILE=_tile(delta), Z_TILE=_tile(zz), DY_TILE=_tile(dy),
        DU_TILE=_tile(du), DDELTA_TILE=_tile(ddelta), DZ_TILE=_tile(dzz),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), **_backward_options(u.device, b * n_dblocks))
    # fixed-order sums over the partials (deterministic)
    dA = dA.sum(0)[:N, :dim].t().contiguous()  # (dim, N)
    dB_out, dC_out = torch.empty_like(B), torch.empty_like(C)
    dB_out.copy_(dB.sum(0)[..., :N].transpose(1, 2))  # (b, L, NP) -> (b, N, L)
    dC_out.copy_(dC.sum(0)[..., :N].transpose(1, 2))
    dD = None if D is None else dD.sum(0)[:dim]
    dbias = None if delta_bias is None else dbias.sum(0)[:dim]
    return du, ddelta, dA, dB_out, dC_out, dD, dz, dbias
