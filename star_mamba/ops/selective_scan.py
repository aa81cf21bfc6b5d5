"""Selective scan (Mamba's S6 recurrence) behind one function with interchangeable backends.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (batch, dim, N), h_{-1} = 0
    y_t = <C_t, h_t> + D * u_t,   then   y_t *= silu(z_t)

Shapes and semantics follow mamba-ssm's ``selective_scan_fn``: u, delta, z (batch, dim, L);
A (dim, N); B, C (batch, N, L); D, delta_bias (dim,).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------- validation

def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.ndim != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    b, d, L = u.shape
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim, N) = ({d}, N), got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.ndim == 4:
            raise ValueError(f"{name} has the grouped shape {tuple(t.shape)} (batch, G, N, L), "
                             f"which is not supported; expected (batch, N, L) = {(b, n, L)}")
    expected = {"delta": (delta, (b, d, L)), "B": (B, (b, n, L)), "C": (C, (b, n, L)),
                "z": (z, (b, d, L)), "D": (D, (d,)), "delta_bias": (delta_bias, (d,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _prepare_delta(delta: Tensor, delta_bias: Optional[Tensor], softplus: bool) -> Tensor:
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if softplus else delta


def _finish(y: Tensor, u: Tensor, D: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- reference

def scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """A Python loop under autograd, line by line the recurrence above: the ground truth."""
    dtype = u.dtype
    ct = _compute_dtype(dtype)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    delta = _prepare_delta(delta, None if delta_bias is None else delta_bias.to(ct), delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, N)
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]  # (b, d, N)
        ys.append((h * C[:, None, :, t]).sum(-1))  # (b, d)
    y = torch.stack(ys, dim=-1)  # (b, d, L)
    y = _finish(y, u, None if D is None else D.to(ct), None if z is None else z.to(ct)).to(dtype)
    return (y, h.to(dtype)) if return_last_state else y


# ----------------------------------------------------------------------------- torch

class _ScanFn(torch.autograd.Function):
    """Core recurrence y_t = <C_t, h_t> with a hand-written reverse-scan backward.

    Everything is laid out time-major, (L, b, d, N), so that the bulk products are contiguous
    and each step of the loop touches one contiguous slab with one fused multiply-add; the
    backward recomputes dA = exp(delta A) rather than keeping it alive (one (L, b, d, N) tensor
    less) and runs the adjoint recurrence g_t = dy_t C_t + dA_{t+1} g_{t+1}. Timings:
    ``star-mamba bench``.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        # u, delta: (b, d, L); A: (d, N); B, C: (b, N, L)
        dT = delta.permute(2, 0, 1).contiguous()  # (L, b, d)
        uT = u.permute(2, 0, 1).contiguous()  # (L, b, d)
        BT = B.permute(2, 0, 1).contiguous()  # (L, b, N)
        CT = C.permute(2, 0, 1).contiguous()  # (L, b, N)
        dA = torch.exp_(dT.unsqueeze(-1) * A)  # (L, b, d, N)
        hs = (dT * uT).unsqueeze(-1) * BT.unsqueeze(2)  # (L, b, d, N): dBu, overwritten by states
        for t in range(1, hs.shape[0]):
            torch.addcmul(hs[t], dA[t], hs[t - 1], out=hs[t])  # h_t = dA_t h_{t-1} + dBu_t
        y = torch.matmul(hs, CT.unsqueeze(-1)).squeeze(-1)  # (L, b, d)
        ctx.save_for_backward(dT, uT, A, BT, CT, hs)
        return y.permute(1, 2, 0), hs[-1].clone()  # a copy: callers may modify it in place

    @staticmethod
    def backward(ctx, dy, dlast):
        dT, uT, A, BT, CT, hs = ctx.saved_tensors
        dA = torch.exp_(dT.unsqueeze(-1) * A)  # (L, b, d, N), recomputed
        dyT = dy.permute(2, 0, 1).contiguous()  # (L, b, d)
        g = dyT.unsqueeze(-1) * CT.unsqueeze(2)  # (L, b, d, N): direct gradient on h_t
        if dlast is not None:
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
        back = lambda x: x.permute(1, 2, 0)  # noqa: E731  (L, b, X) -> (b, X, L)
        return back(du), back(ddelta), dA_param, back(dB), back(dC)


def _scan_core(core: Callable, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
               return_last_state):
    """Shared wrapper: bias and softplus before, D and the z gate after, under plain autograd."""
    dtype = u.dtype
    ct = _compute_dtype(dtype)
    u32, A32, B32, C32 = (t.to(ct) for t in (u, A, B, C))
    delta = _prepare_delta(delta.to(ct), None if delta_bias is None else delta_bias.to(ct),
                           delta_softplus)
    y, last = core(u32.contiguous(), delta.contiguous(), A32.contiguous(), B32.contiguous(),
                   C32.contiguous())
    y = _finish(y, u32, None if D is None else D.to(ct), None if z is None else z.to(ct)).to(dtype)
    return (y, last.to(dtype)) if return_last_state else y


def scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               return_last_state=False):
    """Pure PyTorch, hand-written backward; runs on any device."""
    return _scan_core(_ScanFn.apply, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                      return_last_state)


# ----------------------------------------------------------------------------- numba (CPU)

@functools.lru_cache(maxsize=None)
def _import_numba_kernel() -> Optional[Callable]:
    """The fused CPU kernel, or None (with one warning) where numba cannot load."""
    try:
        from .scan_numba import NumbaScanFn
    except Exception as e:  # numba missing or broken on this platform
        warnings.warn(f"star_mamba: the fused CPU selective scan is unavailable ({e}); falling "
                      "back to the slower pure-PyTorch scan. `pip install numba` enables it.")
        return None
    return NumbaScanFn.apply


def scan_numba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
               return_last_state=False):
    """Fused CPU kernel compiled by numba (forward and backward)."""
    if u.device.type != "cpu":
        raise RuntimeError(f"backend 'numba' runs on CPU tensors; got {u.device}")
    core = _import_numba_kernel()
    if core is None:
        raise RuntimeError("backend 'numba' needs numba (pip install numba)")
    return _scan_core(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                      return_last_state)


# ----------------------------------------------------------------------------- triton (GPU)

def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _import_triton_kernel() -> Optional[Callable]:
    try:
        from .scan_triton import TritonScanFn
    except Exception:  # triton missing (CPU-only torch builds) or unusable
        return None
    return TritonScanFn.apply


def scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
    """Triton kernel, float32 inside (GPU; on CPU only under TRITON_INTERPRET=1). Untested on GPU."""
    if not (u.is_cuda or _triton_interpreted()):
        raise RuntimeError(f"backend 'triton' needs CUDA tensors; got {u.device}")
    core = _import_triton_kernel()
    if core is None:
        raise RuntimeError("backend 'triton' needs the triton package (it ships with PyTorch's "
                           "CUDA wheels)")
    dtype = u.dtype
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    out = _scan_core(core, f32(u), f32(delta), f32(A), f32(B), f32(C), f32(D), f32(z),
                     f32(delta_bias), delta_softplus, return_last_state)
    if return_last_state:
        return out[0].to(dtype), out[1].to(dtype)
    return out.to(dtype)


_TRITON_FAILED: list[str] = []


def _scan_triton_or_torch(*args):
    """``auto`` on GPU without mamba-ssm: Triton, falling back to the torch scan if it fails."""
    if not _TRITON_FAILED:
        try:
            return scan_triton(*args)
        except Exception as e:  # compile or launch failure on this GPU / driver
            _TRITON_FAILED.append(repr(e))
            warnings.warn(f"star_mamba: the Triton selective scan failed ({e}); using the "
                          "pure-PyTorch scan from now on")
    return scan_torch(*args)


# ----------------------------------------------------------------------------- cuda

@functools.lru_cache(maxsize=None)
def _import_cuda_kernel() -> Callable:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # not installed, or installed without its compiled extension
        raise RuntimeError(f"backend 'cuda' needs mamba-ssm with its CUDA extension "
                           f"(pip install 'star-mamba[cuda]'): {e}") from e
    return selective_scan_fn


def scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
              return_last_state=False):
    """mamba-ssm's fused CUDA kernel."""
    if not u.is_cuda:
        raise RuntimeError("backend 'cuda' needs tensors on a CUDA device; got "
                           f"{u.device}")
    fn = _import_cuda_kernel()
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _cuda_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        _import_cuda_kernel()
        return True
    except RuntimeError:
        return False


BACKENDS: dict[str, Callable] = {"reference": scan_reference, "torch": scan_torch,
                                 "numba": scan_numba, "triton": scan_triton, "cuda": scan_cuda}


def _usable(name: str, device: torch.device) -> bool:
    if name == "cuda":
        return _cuda_available(device)
    if name == "numba":
        return device.type == "cpu" and _import_numba_kernel() is not None
    if name == "triton":
        return ((device.type == "cuda" or _triton_interpreted())
                and _import_triton_kernel() is not None)
    return True


def default_backend(device: torch.device) -> str:
    """The fastest backend for ``device``: GPU: cuda (mamba-ssm) > triton > torch;
    CPU: numba > torch."""
    names = ("cuda", "triton") if device.type == "cuda" else ("numba",)
    for name in names:
        if _usable(name, device):
            return name
    return "torch"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device``."""
    device = torch.device(device)
    return [name for name in BACKENDS if _usable(name, device)]


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str = "auto"):
    """Selective scan; returns y (batch, dim, L), plus the last state (batch, dim, N) if asked.

    ``backend``: ``auto`` (see :func:`default_backend`), ``reference``, ``torch``, ``numba``,
    ``triton`` or ``cuda``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if backend == "auto":
        backend = default_backend(u.device)
        if backend == "triton":
            return _scan_triton_or_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                         return_last_state)
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; allowed: "
                         f"'auto', {', '.join(repr(b) for b in BACKENDS)}")
    return BACKENDS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state)
