"""Selective scan (Mamba's S6 recurrence) behind one call, with interchangeable kernels.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h: (batch, dim, N), h_{-1} = 0
    y_t = <C_t, h_t> + D * u_t,   then   y_t *= silu(z_t)

Shapes and semantics follow mamba-ssm's ``selective_scan_fn``: u, delta, z (batch, dim, L);
A (dim, N), real; B, C (batch, N, L), grouped (batch, G, N, L) or constant (dim, N);
D, delta_bias (dim,). y comes back in u's dtype, the last state in float32 (float64 inputs:
float64). The kernels take one (batch, N, L) B and C for every channel, so grouped or constant
B / C run as one kernel call per channel group (:func:`scan_groups`).

Backends:

* ``reference``: a Python loop under autograd (:mod:`.scan_reference`), the ground truth.
* ``torch``, ``numba``: fused *kernels* for the core recurrence y_t = <C_t, h_t>, each a
  module with ``forward``, ``backward`` and ``saved_shape``, behind one pair of
  ``torch.library`` custom ops (``star_mamba::scan_fwd`` / ``scan_bwd``); bias, softplus, D and
  the z gate run around them in PyTorch.
* ``triton``: the whole scan (bias, softplus, recurrence, D, gate) in one kernel each way,
  behind ``star_mamba::scan_fused_fwd`` / ``scan_fused_bwd``; it reads u, delta, z, B, C in
  their own dtypes and strides (no casts, no copies) and returns y stored time-major. Float64
  inputs go to the torch kernel instead (Triton computes in float32).

  Both pairs have a fake implementation and registered autograd, so
  ``torch.compile(fullgraph=True)`` sees one opaque node per scan. A kernel that fails at run
  time (forward or backward: a Triton compile or launch error on an unknown GPU) falls back to
  the ``torch`` kernel with one warning.
* ``cuda``: mamba-ssm's compiled kernel, called as is (its own autograd; under
  ``torch.compile`` a graph break).

Every backend computes in float32 (float64 for float64 inputs) with autocast off and returns y
in the dtype of ``u``, so the scan works unchanged under ``torch.autocast`` (bf16/fp16).
``auto`` is resolved once per device type (:func:`resolve_backend`).
"""
from __future__ import annotations

import importlib
import math
import os
import warnings
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BackendError, ConfigError
from .scan_reference import _finish, _prepare_delta, compute_dtype, per_group, scan_reference

BACKENDS = ("reference", "torch", "numba", "triton", "cuda")
KERNELS = ("torch", "numba", "triton")  # run through the custom ops

# Read once: the Triton interpreter runs the GPU kernel on CPU tensors (tests only).
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- validation

def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None and t.is_complex():
            raise ValueError(f"{name} is complex ({t.dtype}); selective_scan supports real inputs only")
    if u.ndim != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    b, d, L = u.shape
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim, N) = ({d}, N), got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        _check_b_c(name, t, b, d, n, L)
    expected = {"delta": (delta, (b, d, L)), "z": (z, (b, d, L)), "D": (D, (d,)),
                "delta_bias": (delta_bias, (d,))}
    for name, (t, shape) in expected.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_b_c(name: str, t: Tensor, b: int, d: int, n: int, L: int) -> None:
    """B or C: variable (batch, N, L), grouped (batch, G, N, L) with G dividing dim, or
    constant (dim, N), as mamba-ssm's selective_scan_fn takes them."""
    shape = tuple(t.shape)
    if t.ndim == 3 and shape != (b, n, L):
        raise ValueError(f"{name} must have shape {(b, n, L)}, got {shape}")
    if t.ndim == 4:
        if shape[1] == 0 or d % shape[1]:
            raise ValueError(f"{name} has {shape[1]} groups (shape {shape}), which must divide dim={d}")
        if shape != (b, shape[1], n, L):
            raise ValueError(f"{name} must have shape {(b, shape[1], n, L)} (batch, groups, N, L), "
                             f"got {shape}")
    if t.ndim == 2 and shape != (d, n):
        raise ValueError(f"{name} must have shape {(d, n)} (dim, N), got {shape}")
    if t.ndim not in (2, 3, 4):
        raise ValueError(f"{name} must be (batch, N, L), (batch, groups, N, L) or (dim, N), "
                         f"got shape {shape}")


def _groups(t: Tensor, dim: int) -> int:
    """Channel groups sharing one B or C: 1 for (batch, N, L), G for (batch, G, N, L), dim for
    a constant (dim, N)."""
    return dim if t.ndim == 2 else 1 if t.ndim == 3 else t.shape[1]


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
    """All states (L, b, d, N) -> the Triton kernel's checkpoints (its saved_shape): the state
    entering each chunk (zeros for the first)."""
    return load_kernel("triton").checkpoints_from_states(hs, chunk)


def _saved_shape(name: str, b: int, d: int, L: int, N: int) -> tuple[int, ...]:
    return load_kernel(name).saved_shape(b, d, L, N)


def _kernel_forward(name: str, u, delta, A, B, C) -> tuple[Tensor, Tensor, Tensor]:
    if name != "torch" and name not in _FALLEN_BACK:
        try:
            return load_kernel(name).forward(u, delta, A, B, C)
        except Exception as e:
            _fall_back(name, "forward", e)
    y, last, hs = load_kernel("torch").forward(u, delta, A, B, C)
    if name != "torch":
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


def _core_path(kernel: str, u, delta, A, B, C, D, z, delta_bias, delta_softplus
               ) -> tuple[Tensor, Tensor]:
    """A core kernel through scan_fwd, with bias, softplus, D and the z gate around it under
    plain autograd -> y, last in the compute dtype."""
    ct = compute_dtype(u.dtype)
    u32, A32, B32, C32, delta = (t.to(ct).contiguous() for t in (u, A, B, C, delta))
    # delta contiguous before softplus: AOT autograd mis-traces softplus_backward's strides
    # for a transposed input (a PyTorch bug that breaks torch.compile(backend="aot_eager"))
    delta = _prepare_delta(delta, None if delta_bias is None else delta_bias.to(ct),
                           delta_softplus).contiguous()
    y, last, _ = scan_fwd(u32, delta, A32, B32, C32, kernel)
    y = _finish(y, u32, None if D is None else D.to(ct), None if z is None else z.to(ct))
    return y, last


def _fused(kernel: str, u: Tensor) -> bool:
    return kernel == "triton" and compute_dtype(u.dtype) == torch.float32


def scan_kernel(kernel: str, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                delta_softplus=False, return_last_state=False):
    """One of :data:`KERNELS` through its custom op: ``triton`` fused (scan_fused_fwd), the
    others (and float64 inputs) as core kernel + PyTorch around it."""
    dtype = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        if _fused(kernel, u):
            f32 = lambda t: None if t is None else t.float()  # noqa: E731
            y, last, _ = scan_fused_fwd(u, delta, A.float(), B, C, f32(D), z, f32(delta_bias),
                                        bool(delta_softplus), kernel)
        else:
            y, last = _core_path("torch" if kernel == "triton" else kernel, u, delta, A, B, C, D,
                                 z, delta_bias, delta_softplus)
    return (y.to(dtype), last) if return_last_state else y.to(dtype)


# ----------------------------------------------------------------------------- fused op (triton)
#
# Optional inputs (D, z, delta_bias) are Optional[Tensor]; the backward returns an empty tensor
# for the gradient of an absent one. Outputs are fresh tensors whose strides the fake
# implementations reproduce exactly: y time-major, gradients torch.empty_like their input.

def _time_major_like(u: Tensor) -> Tensor:
    """Empty (b, d, L) in u's dtype, stored (b, L, d): strides (L*d, 1, d)."""
    b, d, L = u.shape
    return torch.empty_strided((b, d, L), (L * d, 1, d), dtype=u.dtype, device=u.device)


def _fused_forward(kernel, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    if kernel not in _FALLEN_BACK:
        try:
            return load_kernel(kernel).forward(u, delta, A, B, C, D, z, delta_bias,
                                               delta_softplus)  # y already time-major
        except Exception as e:
            _fall_back(kernel, "forward", e)
    with torch.no_grad():  # the torch kernel; its backward recomputes from the inputs
        y, last = _core_path("torch", u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out = _time_major_like(u)
    out.copy_(y)
    return out, last.float(), u.new_zeros(_saved_shape(kernel, *u.shape, A.shape[1]),
                                          dtype=torch.float32)


def _fused_backward_torch(u, delta, A, B, C, D, z, delta_bias, dy, dlast, delta_softplus):
    """The fallback: the torch kernel, with the gradients of bias, softplus, D and the gate by
    hand (a custom op's implementation runs below autograd). Float32 results."""
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    u, A, B, C, D, z, delta_bias, dy = (f32(t) for t in (u, A, B, C, D, z, delta_bias, dy))
    raw = delta.float() + (0 if delta_bias is None else delta_bias[:, None])
    dt = (F.softplus(raw) if delta_softplus else raw).contiguous()
    torch_kernel = load_kernel("torch")
    yc, _, hs = torch_kernel.forward(u, dt, A, B, C)
    dyc, dz = dy, None
    if z is not None:  # y = (yc + D u) silu(z)
        sz = torch.sigmoid(z)
        dz = dy * (yc if D is None else yc + D[:, None] * u) * sz * (1 + z * (1 - sz))
        dyc = dy * z * sz
    dlast = u.new_zeros(hs.shape[1:]) if dlast is None else dlast.float()
    du, ddt, dA, dB, dC = torch_kernel.backward(u, dt, A, B, C, hs, dyc.contiguous(), dlast)
    dD = None if D is None else (dyc * u).sum((0, 2))
    if D is not None:
        du = du + dyc * D[:, None]
    dr = ddt * torch.sigmoid(raw) if delta_softplus else ddt
    dbias = None if delta_bias is None else dr.sum((0, 2))
    return du, dr, dA, dB, dC, dD, dz, dbias


def _fused_backward(kernel, u, delta, A, B, C, D, z, delta_bias, saved, dy, dlast,
                    delta_softplus):
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    grads = None
    if kernel not in _FALLEN_BACK:
        try:
            du, ddelta, dA, dB, dC, dD, dz, dbias = load_kernel(kernel).backward(
                u, delta, A, B, C, saved, dy, dlast, D, z, delta_bias, delta_softplus)
            grads = (du, ddelta, dA, dB, dC, dD, dz, dbias)
        except Exception as e:
            _fall_back(kernel, "backward", e)
    if grads is None:
        grads = _fused_backward_torch(*inputs, dy, dlast, delta_softplus)
    return tuple(u.new_empty(0) if t is None else _like(t, g) for t, g in zip(inputs, grads))


def _like(t: Tensor, g: Optional[Tensor]) -> Tensor:
    """g with the dtype and strides of torch.empty_like(t) (what the fake returns): as is when
    it has them (the Triton kernel allocates its gradients that way), else copied."""
    if g is not None and g.dtype == t.dtype and g.stride() == torch.empty_like(
            t, device="meta").stride():
        return g
    return torch.empty_like(t).copy_(torch.zeros_like(t) if g is None else g)


@torch.library.custom_op("star_mamba::scan_fused_fwd", mutates_args=())
def scan_fused_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                   delta_softplus: bool, kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """The whole scan -> y (b, d, L) in u's dtype stored time-major, last state (b, d, N)
    float32, what the kernel keeps for its backward."""
    with torch.autocast(u.device.type, enabled=False):
        return _fused_forward(kernel, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@scan_fused_fwd.register_fake
def _scan_fused_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernel):
    b, d, L = u.shape
    N = A.shape[1]
    f32 = dict(dtype=torch.float32)
    return (_time_major_like(u), u.new_empty(b, d, N, **f32),
            u.new_empty(_saved_shape(kernel, b, d, L, N), **f32))


@torch.library.custom_op("star_mamba::scan_fused_bwd", mutates_args=())
def scan_fused_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                   saved: Tensor, dy: Tensor, dlast: Optional[Tensor], delta_softplus: bool,
                   kernel: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                         Tensor]:
    """Gradients of (y, last) -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each shaped
    (and strided) as its input; an empty tensor for an absent input."""
    with torch.autocast(u.device.type, enabled=False):
        return _fused_backward(kernel, u, delta, A, B, C, D, z, delta_bias, saved, dy, dlast,
                               delta_softplus)


@scan_fused_bwd.register_fake
def _scan_fused_bwd_fake(u, delta, A, B, C, D, z, delta_bias, saved, dy, dlast, delta_softplus,
                         kernel):
    return tuple(u.new_empty(0) if t is None else torch.empty_like(t)
                 for t in (u, delta, A, B, C, D, z, delta_bias))


def _fused_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, kernel = inputs
    ctx.delta_softplus, ctx.kernel = delta_softplus, kernel
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _scan_fused_fwd_backward(ctx, dy, dlast, _dsaved):
    u, delta, A, B, C, D, z, delta_bias, saved = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    grads = scan_fused_bwd(u, delta, A, B, C, D, z, delta_bias, saved, dy, dlast,
                           ctx.delta_softplus, ctx.kernel)
    grads = [None if t is None else g for t, g in zip((u, delta, A, B, C, D, z, delta_bias),
                                                       grads)]
    return (*grads, None, None)


scan_fused_fwd.register_autograd(_scan_fused_fwd_backward, setup_context=_fused_setup_context)


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
        raise BackendError("backend 'cuda' needs mamba-ssm with its CUDA extension "
                           f"(pip install 'star-mamba[cuda]'): {_CUDA_ERROR[0]}")
    if not u.is_cuda:
        raise BackendError(f"backend 'cuda' needs tensors on a CUDA device; got {u.device}")
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
            raise ConfigError(f"unknown selective-scan backend {backend!r}; allowed: "
                              f"'auto', {', '.join(repr(b) for b in BACKENDS)}")
        elif backend == "numba" and device_type != "cpu":
            raise BackendError(f"backend 'numba' runs on CPU tensors; got {device_type}")
        elif backend == "numba" and load_kernel("numba") is None:
            raise BackendError(f"backend 'numba' needs numba (pip install numba): "
                               f"{_LOAD_ERRORS['numba']}")
        elif backend == "triton" and not (device_type == "cuda" or _TRITON_INTERPRET):
            raise BackendError(f"backend 'triton' needs CUDA tensors; got {device_type}")
        elif backend == "triton" and load_kernel("triton") is None:
            raise BackendError("backend 'triton' needs the triton package (it ships with "
                               f"PyTorch's CUDA wheels): {_LOAD_ERRORS['triton']}")
        else:
            _RESOLVED[key] = backend
    return _RESOLVED[key]


def scan_groups(kernel: str, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                delta_softplus=False, return_last_state=False):
    """Grouped or constant B / C through a kernel, which takes one (b, N, L) B and C for all
    channels: one kernel call per channel group (a constant B or C makes every channel a group),
    the outputs concatenated over channels."""
    b, d, L = u.shape
    groups = math.lcm(_groups(B, d), _groups(C, d))
    size = d // groups
    Bg, Cg = (per_group(t, groups, b, d, L) for t in (B, C))  # (b, groups, N, L)
    ys, lasts = [], []
    for g in range(groups):
        channels = slice(g * size, (g + 1) * size)
        part = lambda t: None if t is None else t[channels] if t.ndim <= 2 else t[:, channels]  # noqa: E731
        y, last = scan_kernel(kernel, part(u), part(delta), part(A), Bg[:, g], Cg[:, g], part(D),
                              part(z), part(delta_bias), delta_softplus, return_last_state=True)
        ys.append(y)
        lasts.append(last)
    y, last = torch.cat(ys, dim=1), torch.cat(lasts, dim=1)
    return (y, last) if return_last_state else y


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                   delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str = "auto"):
    """Selective scan; returns y (batch, dim, L) in u's dtype, plus the last state
    (batch, dim, N) if asked, in the compute dtype (float32; float64 for float64 inputs).

    B and C are each (batch, N, L), grouped (batch, G, N, L) or constant (dim, N); a real A
    only (a complex input raises ValueError).

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
    if B.ndim != 3 or C.ndim != 3:
        return scan_groups(name, *args)
    return scan_kernel(name, *args)
