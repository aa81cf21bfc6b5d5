"""Triton scan v2, as shipped until commit ab4e4b0 (star_mamba/ops/scan_triton.py), kept only so that
benchmarks/gpu/triton_scan_versions.py can time it against v3 (v2 is still 3-19% faster at
STAR-tiny width, where v3 underfills the GPU). Not part of the package; unchanged below.

Selective scan in Triton ("Triton scan v2"): the core recurrence, forward and backward.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_{-1} = 0,   y_t = <C_t, h_t>

Only this core is computed here (no D, z, delta_bias or softplus: the caller handles those, and
owns autograd, dtype conversion and fallback). Three functions make the interface:
``saved_shape``, ``forward`` and ``backward``.

Layout: one program per (batch, block of ``block_d`` channels). The (block_d, NP) state lives in
registers, NP = next power of two >= d_state with the padding masked, so any d_state works. The
sequence is walked in chunks of ``chunk`` steps.

Memory (b = batch, D = dim, L = length, N = d_state, n_chunks = cdiv(L, chunk),
n_dblocks = cdiv(D, block_d), NP = next_power_of_2(N)); nothing of size b*D*L*N exists anywhere:

* forward saves only ``checkpoints`` (b, D, n_chunks, N) float32: the state entering each chunk;
* backward allocates a per-program scratch (b, n_dblocks, chunk, block_d, NP) float32, into which
  it recomputes one chunk's states from its checkpoint before running the adjoint recurrence
  g_t = dy_t C_t + exp(delta_{t+1} A) g_{t+1} (g starts at dlast) backwards through that chunk;
  plus deterministic partials, summed with ``torch.sum`` (no atomics): dA (b, D, N) and
  dB, dC (n_dblocks, b, L, N), all float32.

Inputs u, delta (b, D, L) and B, C (b, N, L) may be float32, bfloat16 or float16; A (D, N) is
float32. Loads upcast to float32 and all arithmetic is float32; y, last and dA are float32, du,
ddelta, dB and dC come back in the dtype of their input. Offsets are 64-bit (program ids are cast
to int64 before any multiplication by a stride), meant for b*D*L > 2**31; that size is not tested.

Status: correct in Triton's CPU interpreter (``TRITON_INTERPRET=1``, exercised by
tests/test_scan_triton.py, which also lowers both kernels ahead of time to an sm_90 cubin on a
machine without a GPU); never yet run or timed on a GPU. Each step loads u, delta, B, C one time
index at a time (strided across channels / states): simple and portable, not tuned.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK: int = 64
BLOCK_D: int = 32


@triton.jit
def _forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, y_ptr, last_ptr, ckpt_ptr,
                    DIM, L, N, N_CHUNKS,
                    NP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    # u, delta: (b, DIM, L) any float dtype;  A: (DIM, N);  B, C: (b, N, L)
    # y: (b, DIM, L) f32;  last: (b, DIM, N) f32;  ckpt: (b, DIM, N_CHUNKS, N) f32
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    offs_n = tl.arange(0, NP).to(tl.int64)  # (NP,)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]  # (BLOCK_D, NP)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn,
                other=0.0).to(tl.float32)  # (BLOCK_D, NP)
    chan = pid_b * DIM + offs_d  # (BLOCK_D,) flat (batch, channel) index
    row = chan * L  # (BLOCK_D,) start of each channel's sequence in u, delta, y
    bc = pid_b * N * L + offs_n * L  # (NP,) start of each state's sequence in B, C
    ckpt = (chan[:, None] * N_CHUNKS) * N + offs_n[None, :]  # (BLOCK_D, NP), chunk 0
    h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    for c in range(N_CHUNKS):
        tl.store(ckpt_ptr + ckpt + c * N, h, mask=mask_dn)  # state entering chunk c
        for k in range(CHUNK):
            t = c * CHUNK + k
            valid = t < L  # past the end: dt = x = 0, so h is left unchanged
            m_d = mask_d & valid
            dt = tl.load(delta_ptr + row + t, mask=m_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
            x = tl.load(u_ptr + row + t, mask=m_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
            Bt = tl.load(B_ptr + bc + t, mask=mask_n & valid, other=0.0).to(tl.float32)  # (NP,)
            Ct = tl.load(C_ptr + bc + t, mask=mask_n & valid, other=0.0).to(tl.float32)  # (NP,)
            h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
            tl.store(y_ptr + row + t, tl.sum(h * Ct[None, :], axis=1), mask=m_d)
    tl.store(last_ptr + chan[:, None] * N + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, ckpt_ptr, dy_ptr, dlast_ptr,
                     scratch_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr,
                     BATCH, DIM, L, N, N_CHUNKS, N_DBLOCKS,
                     NP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    # inputs as in the forward; ckpt: (b, DIM, N_CHUNKS, N) f32; dy: (b, DIM, L); dlast: (b, DIM, N)
    # scratch: (b, N_DBLOCKS, CHUNK, BLOCK_D, NP) f32, slot k = state entering step k of the chunk
    # du, ddelta: (b, DIM, L) in the input dtype; dA: (b, DIM, N) f32 per-batch partials;
    # dB, dC: (N_DBLOCKS, b, L, N) f32 per-channel-block partials (contiguous over n per step)
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    offs_n = tl.arange(0, NP).to(tl.int64)  # (NP,)
    mask_d = offs_d < DIM
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]  # (BLOCK_D, NP)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn,
                other=0.0).to(tl.float32)  # (BLOCK_D, NP)
    chan = pid_b * DIM + offs_d  # (BLOCK_D,)
    row = chan * L  # (BLOCK_D,)
    bc = pid_b * N * L + offs_n * L  # (NP,) into B, C
    part = (pid_d * BATCH + pid_b) * L * N + offs_n  # (NP,) into the dB, dC partials at t = 0
    state = chan[:, None] * N + offs_n[None, :]  # (BLOCK_D, NP) into dlast, dA
    ckpt = (chan[:, None] * N_CHUNKS) * N + offs_n[None, :]  # (BLOCK_D, NP), chunk 0
    slot = (tl.arange(0, BLOCK_D).to(tl.int64)[:, None] * NP + offs_n[None, :])  # (BLOCK_D, NP)
    scratch = scratch_ptr + (pid_b * N_DBLOCKS + pid_d) * (CHUNK * BLOCK_D * NP) + slot

    g = tl.load(dlast_ptr + state, mask=mask_dn, other=0.0).to(tl.float32)  # gradient on h
    dA_acc = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    for i in range(N_CHUNKS):
        c = N_CHUNKS - 1 - i
        # 1) recompute the chunk's states from its checkpoint; slot k <- h_{t-1}, t = c*CHUNK + k
        h = tl.load(ckpt_ptr + ckpt + c * N, mask=mask_dn, other=0.0)
        for k in range(CHUNK):
            t = c * CHUNK + k
            valid = t < L
            m_d = mask_d & valid
            tl.store(scratch + k * (BLOCK_D * NP), h)
            dt = tl.load(delta_ptr + row + t, mask=m_d, other=0.0).to(tl.float32)
            x = tl.load(u_ptr + row + t, mask=m_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + bc + t, mask=mask_n & valid, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
        tl.debug_barrier()  # scratch written above is read below, possibly by other threads
        # 2) adjoint recurrence backwards through the chunk; h_cur = h_t, kept in registers
        h_cur = h
        for j in range(CHUNK):
            k = CHUNK - 1 - j
            t = c * CHUNK + k
            valid = t < L  # past the end: dt = dy = 0, so g passes through unchanged
            m_d = mask_d & valid
            m_n = mask_n & valid
            h_prev = tl.load(scratch + k * (BLOCK_D * NP))  # (BLOCK_D, NP) h_{t-1}
            dt = tl.load(delta_ptr + row + t, mask=m_d, other=0.0).to(tl.float32)
            x = tl.load(u_ptr + row + t, mask=m_d, other=0.0).to(tl.float32)
            dyt = tl.load(dy_ptr + row + t, mask=m_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + bc + t, mask=m_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc + t, mask=m_n, other=0.0).to(tl.float32)
            a = tl.exp(dt[:, None] * A)  # (BLOCK_D, NP)
            g = g + dyt[:, None] * Ct[None, :]  # total gradient on h_t
            gda = g * h_prev * a  # gradient on delta_t * A, (BLOCK_D, NP)
            gB = tl.sum(g * Bt[None, :], axis=1)  # (BLOCK_D,) gradient on delta_t * u_t
            ddt = tl.sum(gda * A, axis=1) + gB * x
            dut = gB * dt
            tl.store(ddelta_ptr + row + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=m_d)
            tl.store(du_ptr + row + t, dut.to(du_ptr.dtype.element_ty), mask=m_d)
            tl.store(dB_ptr + part + t * N, tl.sum(g * (dt * x)[:, None], axis=0), mask=m_n)
            tl.store(dC_ptr + part + t * N, tl.sum(dyt[:, None] * h_cur, axis=0), mask=m_n)
            dA_acc += gda * dt[:, None]
            g = g * a  # carried to h_{t-1}
            h_cur = h_prev
        tl.debug_barrier()  # the next chunk overwrites the scratch just read
    tl.store(dA_ptr + state, dA_acc, mask=mask_dn)


def _n_chunks(length: int, chunk: int) -> int:
    return triton.cdiv(length, chunk)


def saved_shape(batch: int, dim: int, length: int, d_state: int, chunk: int = CHUNK
                ) -> tuple[int, ...]:
    """Shape of the checkpoints tensor forward() returns:
    (batch, dim, cdiv(length, chunk), d_state)."""
    return (batch, dim, _n_chunks(length, chunk), d_state)


def _scratch_shape(batch: int, dim: int, d_state: int, chunk: int = CHUNK,
                   block_d: int = BLOCK_D) -> tuple[int, ...]:
    """The backward's per-program chunk scratch: (batch, cdiv(dim, block_d), chunk, block_d, NP).

    Independent of the sequence length; NP = next power of two >= d_state.
    """
    return (batch, triton.cdiv(dim, block_d), chunk, block_d, triton.next_power_of_2(d_state))


def _partial_shapes(batch: int, dim: int, length: int, d_state: int, block_d: int = BLOCK_D
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The backward's partials: dA (batch, dim, N) and dB / dC (cdiv(dim, block_d), batch, L, N)."""
    return (batch, dim, d_state), (triton.cdiv(dim, block_d), batch, length, d_state)


def _check_params(chunk: int, block_d: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if block_d < 1 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two, got {block_d}")


def forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int = CHUNK,
            block_d: int = BLOCK_D) -> tuple[Tensor, Tensor, Tensor]:
    """-> y (b, dim, L) float32, last (b, dim, N) float32, checkpoints (saved_shape) float32."""
    _check_params(chunk, block_d)
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    b, dim, L = u.shape  # u, delta: (b, dim, L); A: (dim, N); B, C: (b, N, L)
    N = A.shape[1]
    n_chunks = _n_chunks(L, chunk)
    y = torch.empty(b, dim, L, dtype=torch.float32, device=u.device)
    last = torch.empty(b, dim, N, dtype=torch.float32, device=u.device)
    checkpoints = torch.empty(saved_shape(b, dim, L, N, chunk), dtype=torch.float32,
                              device=u.device)  # (b, dim, n_chunks, N)
    grid = (b, triton.cdiv(dim, block_d))
    _forward_kernel[grid](u, delta, A, B, C, y, last, checkpoints, dim, L, N, n_chunks,
                          NP=triton.next_power_of_2(N), CHUNK=chunk, BLOCK_D=block_d)
    return y, last, checkpoints


def backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, checkpoints: Tensor,
             dy: Tensor, dlast: Tensor, chunk: int = CHUNK, block_d: int = BLOCK_D
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dy (b, dim, L) float32 and dlast (b, dim, N) float32 (zeros where unused) ->
    du, ddelta (b, dim, L), dA (dim, N) float32, dB, dC (b, N, L)."""
    _check_params(chunk, block_d)
    u, delta, A, B, C, checkpoints, dy, dlast = (
        t.contiguous() for t in (u, delta, A, B, C, checkpoints, dy, dlast))
    b, dim, L = u.shape
    N = A.shape[1]
    n_chunks = _n_chunks(L, chunk)
    if tuple(checkpoints.shape) != saved_shape(b, dim, L, N, chunk):
        raise ValueError(f"checkpoints must have shape {saved_shape(b, dim, L, N, chunk)} "
                         f"(same chunk as the forward), got {tuple(checkpoints.shape)}")
    sshape = _scratch_shape(b, dim, N, chunk, block_d)  # (b, n_dblocks, chunk, block_d, NP)
    n_dblocks = sshape[1]
    dA_shape, dBC_shape = _partial_shapes(b, dim, L, N, block_d)
    f32 = dict(dtype=torch.float32, device=u.device)
    scratch = torch.empty(sshape, **f32)
    du = torch.empty(b, dim, L, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(b, dim, L, dtype=delta.dtype, device=u.device)
    dA = torch.empty(dA_shape, **f32)  # (b, dim, N)
    dB = torch.empty(dBC_shape, **f32)  # (n_dblocks, b, L, N)
    dC = torch.empty(dBC_shape, **f32)  # (n_dblocks, b, L, N)
    grid = (b, n_dblocks)
    _backward_kernel[grid](u, delta, A, B, C, checkpoints, dy, dlast, scratch,
                           du, ddelta, dA, dB, dC, b, dim, L, N, n_chunks, n_dblocks,
                           NP=sshape[4], CHUNK=chunk, BLOCK_D=block_d)
    # fixed-order sums over the partials (deterministic), then (b, L, N) -> (b, N, L)
    dB = dB.sum(0).transpose(1, 2).to(B.dtype).contiguous()
    dC = dC.sum(0).transpose(1, 2).to(C.dtype).contiguous()
    return du, ddelta, dA.sum(0), dB, dC  # dA: (b, dim, N) -> (dim, N)
