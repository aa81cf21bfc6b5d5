"""Selective scan (Mamba's S6 recurrence) behind one call, with interchangeable kernels.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (batch, dim, N), h_{-1} = 0
    y_t = <C_t, h_t> + D * u_t,   then   y_t *= silu(z_t)

Shapes and semantics follow mamba-ssm's ``selective_scan_fn``: u, delta, z (batch, dim, L);
A (dim, N); B, C (batch, N, L); D, delta_bias (dim,).

Backends:

* ``reference``: a Python loop under autograd (:mod:`.scan_reference`), the ground truth.
* ``torch``, ``numba``, ``triton``: fused *kernels*, each a module with ``forward``,
  ``backward`` and ``saved_shape`` for the core recurrence y_t = <C_t, h_t>. They run behind
  one pair of ``torch.library`` custom ops (``star_mamba::scan_fwd`` / ``scan_bwd``) with a
  fake implementation and registered autograd, so ``torch.compile(fullgraph=True)`` sees one
  opaque node per scan. A kernel that fails at run time (forward or backward: a Triton compile
  or launch error on an unknown GPU) falls back to the ``torch`` kernel with one warning.
* ``cuda``: mamba-ssm's compiled kernel, called as is (its own autograd; under
  ``torch.compile`` a graph break).

Every backend computes in float32 (float64 for float64 inputs) with autocast off and returns y
in the dtype of ``u``, so the scan works unchanged under ``torch.autocast`` (bf16/fp16).
``auto`` is resolved once per device type (:func:`resolve_backend`).
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from .scan_reference import _finish, _prepare_delta, compute_dtype, scan_reference

BACKENDS = ("reference", "torch", "numba", "triton", "cuda")
KERNELS = ("torch", "numba", "triton")  # run through the custom ops

# Read once: the Triton interpreter runs the GPU kernel on CPU tensors (tests only).
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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


# ----------------------------------------------------------------------------- kernels

_MODULES = {"torch": ".scan_torch", "numba": ".scan_numba", "triton": ".scan_triton"}
_LOADED: dict[str, Optional[ModuleType]] = {}  # kernel -> module, or None if it cannot import
_LOAD_ERRORS: dict[str, str] = {}
_FALLEN_BACK: dict[str, str] = {}  # kernel -> the error that made it fall back to torch


def load_kernel(name: str) -> Optional[ModuleType]:
    """The kernel's module, or None where it cannot be imported (tried once)."""
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(_MODULES[name], __package__)
        except Exception as e:  # numba/triton missing or broken on this platform
            _LOADED[name], _LOAD_ERRORS[name] = None, f"{type(e).__name__}: {e}"
    return _LOADED[name]


def _fall_back(name: str, stage: str, error: Exception) -> None:
    _FALLEN_BACK[name] = f"{type(error).__name__}: {error}"
    warnings.warn(f"star_mamba: the {name} selective scan failed in its {stage} "
                  f"({_FALLEN_BACK[name]}); using the pure-PyTorch scan from now on")


def _triton_checkpoints(hs: Tensor, chunk: int) -> Tensor:
    """All states (L, b, d, N) -> the Triton kernel's checkpoints (b, d, cdiv(L, chunk), N):
    the state entering each chunk (zeros for the first)."""
    entering = torch.cat([torch.zeros_like(hs[:1]), hs[chunk - 1:hs.shape[0] - 1:chunk]])
    return entering.permute(1, 2, 0, 3).contiguous()


def _saved_shape(name: str, b: int, d: int, L: int, N: int) -> tuple[int, ...]:
    return load_kernel(name).saved_shape(b, d, L, N)


def _kernel_forward(name: str, u, delta, A, B, C) -> tuple[Tensor, Tensor, Tensor]:
    if name != "torch" and name not in _FALLEN_BACK:
        try:
            return load_kernel(name).forward(u, delta, A, B, C)
        except Exception as e:
            _fall_back(name, "forward", e)
    y, last, hs = load_kernel("torch").forward(u, delta, A, B, C)
    if name == "triton":
        hs = _triton_checkpoints(hs, load_kernel("triton").CHUNK)
    elif name != "torch":
        hs = u.new_empty(_saved_shape(name, *u.shape, A.shape[1]))
    return y, last, hs


def _kernel_backward(name: str, u, delta, A, B, C, saved, dy, dlast):
    if name != "torch" and name not in _FALLEN_BACK:
        try:
            return load_kernel(name).backward(u, delta, A, B, C, saved, dy, dlast)
        except Exception as e:
            _fall_back(name, "backward", e)
    torch_kernel = load_kernel("torch")
    hs = saved if name == "torch" else torch_kernel.forward(u, delta, A, B, C)[2]
    return torch_kernel.backward(u, delta, A, B, C, hs, dy, dlast)


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("star_mamba::scan_fwd", mutates_args=())
def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, kernel: str
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Core recurrence on contiguous float tensors of one dtype ->
    y (b, d, L), last state (b, d, N), what the kernel keeps for its backward."""
    with torch.autocast(u.device.type, enabled=False):
        return _kernel_forward(kernel, u, delta, A, B, C)


@scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, kernel):
    b, d, L = u.shape
    N = A.shape[1]
    return u.new_empty(b, d, L), u.new_empty(b, d, N), u.new_empty(_saved_shape(kernel, b, d, L, N))


@torch.library.custom_op("star_mamba::scan_bwd", mutates_args=())
def scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, saved: Tensor,
             dy: Tensor, dlast: Tensor, kernel: str
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (y, last) -> (du, ddelta, dA, dB, dC), shaped as the inputs."""
    with torch.autocast(u.device.type, enabled=False):
        grads = _kernel_backward(kernel, u, delta, A, B, C, saved, dy, dlast)
    return tuple(g.contiguous() for g in grads)


@scan_bwd.register_fake
def _scan_bwd_fake(u, delta, A, B, C, saved, dy, dlast, kernel):
    return tuple(torch.empty_like(t) for t in (u, delta, A, B, C))


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, kernel = inputs
    ctx.kernel = kernel
    ctx.save_for_backward(u, delta, A, B, C, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _scan_fwd_backward(ctx, dy, dlast, _dsaved):
    u, delta, A, B, C, saved = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy.contiguous()
    dlast = (u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if dlast is None
             else dlast.contiguous())
    return (*scan_bwd(u, delta, A, B, C, saved, dy, dlast, ctx.kernel), None)


scan_fwd.register_autograd(_scan_fwd_backward, setup_context=_setup_context)


def scan_kernel(kernel: str, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                delta_softplus=False, return_last_state=False):
    """One of :data:`KERNELS` through the custom op, with bias, softplus, D and the z gate
    around it under plain autograd."""
    dtype = u.dtype
    ct = compute_dtype(dtype)
    with torch.autocast(u.device.type, enabled=False):
        u32, A32, B32, C32, delta = (t.to(ct).contiguous() for t in (u, A, B, C, delta))
        # delta contiguous before softplus: AOT autograd mis-traces softplus_backward's strides
        # for a transposed input (a PyTorch bug that breaks torch.compile(backend="aot_eager"))
        delta = _prepare_delta(delta, None if delta_bias is None else delta_bias.to(ct),
                               delta_softplus).contiguous()
        y, last, _ = scan_fwd(u32, delta, A32, B32, C32, kernel)
        y = _finish(y, u32, None if D is None else D.to(ct), None if z is None else z.to(ct))
    return (y.to(dtype), last.to(dtype)) if return_last_state else y.to(dtype)


# ----------------------------------------------------------------------------- cuda (mamba-ssm)

_CUDA_FN: list = []  # mamba-ssm's selective_scan_fn, imported once
_CUDA_ERROR: list[str] = []


def _cuda_fn():
    if not _CUDA_FN and not _CUDA_ERROR:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            _CUDA_FN.append(selective_scan_fn)
        except Exception as e:  # not installed, or installed without its compiled extension
            _CUDA_ERROR.append(f"{type(e).__name__}: {e}")
    return _CUDA_FN[0] if _CUDA_FN else None


def scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
              return_last_state=False):
    """mamba-ssm's fused CUDA kernel."""
    fn = _cuda_fn()
    if fn is None:
        raise RuntimeError("backend 'cuda' needs mamba-ssm with its CUDA extension "
                           f"(pip install 'star-mamba[cuda]'): {_CUDA_ERROR[0]}")
    if not u.is_cuda:
        raise RuntimeError(f"backend 'cuda' needs tensors on a CUDA device; got {u.device}")
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# ----------------------------------------------------------------------------- choosing

def _usable(name: str, device_type: str) -> bool:
    if name == "cuda":
        return device_type == "cuda" and _cuda_fn() is not None
    if name == "numba":
        return device_type == "cpu" and load_kernel("numba") is not None
    if name == "triton":
        return (device_type == "cuda" or _TRITON_INTERPRET) and load_kernel("triton") is not None
    return True


def default_backend(device: torch.device | str) -> str:
    """The fastest backend for ``device``: GPU: cuda (mamba-ssm) > triton > torch;
    CPU: numba > torch."""
    device_type = torch.device(device).type
    names = ("cuda", "triton") if device_type == "cuda" else ("numba",)
    for name in names:
        if _usable(name, device_type):
            return name
    if device_type == "cpu" and load_kernel("numba") is None:
        warnings.warn(f"star_mamba: the fused CPU selective scan is unavailable "
                      f"({_LOAD_ERRORS.get('numba')}); falling back to the slower pure-PyTorch "
                      "scan. `pip install numba` enables it.")
    return "torch"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device``."""
    device_type = torch.device(device).type
    return [name for name in BACKENDS if _usable(name, device_type)]


_RESOLVED: dict[tuple[str, str], str] = {}


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device_type: str) -> str:
    """``backend`` as it will run on ``device_type``, decided once per pair (a constant to
    ``torch.compile``). Raises ValueError for an unknown name, RuntimeError for one that cannot
    run there."""
    key = (backend, device_type)
    if key not in _RESOLVED:
        if backend == "auto":
            _RESOLVED[key] = default_backend(device_type)
        elif backend not in BACKENDS:
            raise ValueError(f"unknown selective-scan backend {backend!r}; allowed: "
                             f"'auto', {', '.join(repr(b) for b in BACKENDS)}")
        elif backend == "numba" and device_type != "cpu":
            raise RuntimeError(f"backend 'numba' runs on CPU tensors; got {device_type}")
        elif backend == "numba" and load_kernel("numba") is None:
            raise RuntimeError(f"backend 'numba' needs numba (pip install numba): "
                               f"{_LOAD_ERRORS['numba']}")
        elif backend == "triton" and not (device_type == "cuda" or _TRITON_INTERPRET):
            raise RuntimeError(f"backend 'triton' needs CUDA tensors; got {device_type}")
        elif backend == "triton" and load_kernel("triton") is None:
            raise RuntimeError("backend 'triton' needs the triton package (it ships with "
                               f"PyTorch's CUDA wheels): {_LOAD_ERRORS['triton']}")
        else:
            _RESOLVED[key] = backend
    return _RESOLVED[key]


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str = "auto"):
    """Selective scan; returns y (batch, dim, L) in u's dtype, plus the last state
    (batch, dim, N) if asked.

    ``backend``: ``auto`` (see :func:`default_backend`), ``reference``, ``torch``, ``numba``,
    ``triton`` or ``cuda``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device.type)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "reference":
        return scan_reference(*args)
    if name == "cuda":
        return scan_cuda(*args)
    return scan_kernel(name, *args)
