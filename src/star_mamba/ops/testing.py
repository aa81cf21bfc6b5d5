"""Helpers for checking selective-scan backends against each other: inputs, a probe loss with
its gradients, error measures. Used by tests/ and the GPU harness (benchmarks/gpu/).

* :func:`scan_inputs`: Mamba-initialised arguments of ``selective_scan`` (shapes, dtypes,
  device, seed), optionally in the memory layouts the model feeds the scan (:func:`to_layout`);
* :func:`scan_with_grads`: one backend on fresh leaf copies, with return_last_state=True, and the
  gradients of every input under the probe loss sum(y * linspace(-1, 1, L)) + sum(last_state^2);
* :func:`error_stats`: max absolute error, the reference's max magnitude and their ratio;
* :func:`fallbacks`: the kernels that failed at run time and now run as the torch kernel.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import scan as _scan

ACTIVATIONS = ("u", "delta", "B", "C", "z")  # under autocast these come in the autocast dtype


def scan_inputs(batch: int, dim: int, length: int, d_state: int = 16, *,
                dtype: torch.dtype = torch.float32, param_dtype: torch.dtype = torch.float32,
                device: Union[str, torch.device] = "cpu", seed: int = 0, stress: bool = False,
                layout: str = "channel") -> dict[str, Optional[Tensor]]:
    """Arguments of ``selective_scan(..., delta_softplus=True)`` as Mamba initialises them.

    A = -(1..N) in every channel; delta_bias the inverse softplus of a dt log-uniform in
    [1e-3, 0.1]; delta 0.1 N(0, 1) (before bias and softplus); u, B, C, D, z N(0, 1).
    ``stress``: large steps and fast decays instead (delta uniform in [0, 3), A = -linspace(1, 16),
    no delta_bias): exp(delta A) underflows, nothing may overflow.

    u, delta, B, C, z are in ``dtype``, A, D and delta_bias in ``param_dtype`` (the model keeps
    its parameters in float32 under autocast). Every value is drawn in the wider of the two from
    one generator on ``device`` seeded with ``seed``, then rounded. ``layout``: :func:`to_layout`.
    """
    wide = torch.promote_types(dtype, param_dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, dtype=wide, device=device)

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, **kw)

    if stress:
        delta, bias = torch.rand(batch, dim, length, **kw) * 3, None
        A = -torch.linspace(1, 16, d_state, dtype=wide, device=device).repeat(dim, 1)
    else:
        dt = torch.exp(torch.rand(dim, **kw) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        bias = dt + torch.log(-torch.expm1(-dt))
        delta = normal(batch, dim, length) * 0.1
        A = -torch.arange(1, d_state + 1, dtype=wide, device=device).repeat(dim, 1)
    x = dict(u=normal(batch, dim, length), delta=delta, A=A, B=normal(batch, d_state, length),
             C=normal(batch, d_state, length), D=normal(dim), z=normal(batch, dim, length),
             delta_bias=bias)
    x = {k: None if v is None else v.to(dtype if k in ACTIVATIONS else param_dtype)
         for k, v in x.items()}
    return to_layout(x, layout)


def to_layout(x: Mapping[str, Optional[Tensor]], layout: str,
              filler: Optional[Callable[[tuple, Tensor], Tensor]] = None
              ) -> dict[str, Optional[Tensor]]:
    """The same values of u, delta, z, B, C in one of the memory layouts the scan meets:

    * ``channel``: as given ((b, dim, L) and (b, N, L), contiguous);
    * ``time``: transposed views of (b, L, dim) and (b, L, N) tensors;
    * ``model``: as Mamba feeds it: u as given (the conv output is channel-major), delta
      time-major, z the second half of a (b, L, 2 dim) tensor (not dense), B and C slices of one
      (b, L, 3 + 2N) tensor (x_proj's output).

    ``filler(shape, like)`` makes the parts of the wider tensors that the slices leave out (the
    first half of the z tensor, then the first 3 columns of the B/C one): zeros by default.
    """
    x = dict(x)
    time_major = lambda t: t.mT.contiguous().mT  # noqa: E731
    if layout == "time":
        x.update({k: time_major(x[k]) for k in ACTIVATIONS if x.get(k) is not None})
    elif layout == "model":
        fill = filler or (lambda shape, like: like.new_zeros(shape))
        z, B, C = x["z"].mT, x["B"].mT, x["C"].mT  # (b, L, dim), (b, L, N)
        b, L, dim = z.shape
        x["delta"] = time_major(x["delta"])
        x["z"] = torch.cat([fill((b, L, dim), z), z], dim=-1)[..., dim:].mT
        x_dbl = torch.cat([fill((b, L, 3), B), B, C], dim=-1)
        n = B.shape[-1]
        x["B"], x["C"] = x_dbl[..., 3:3 + n].mT, x_dbl[..., 3 + n:].mT
    elif layout != "channel":
        raise ValueError(f"unknown layout {layout!r}: channel, time or model")
    return x


class ScanRun(NamedTuple):
    """What :func:`scan_with_grads` returns (unpacks as ``y, last_state, grads``)."""

    y: Tensor
    last_state: Tensor
    grads: dict[str, Tensor]  # argument name -> gradient of the probe loss

    def tensors(self) -> dict[str, Tensor]:
        """Everything flat: y, last_state and grad_<name> for each gradient."""
        return dict(y=self.y, last_state=self.last_state,
                    **{f"grad_{k}": g for k, g in self.grads.items()})


def scan_with_grads(backend: Union[str, Callable[..., tuple[Tensor, Tensor]]],
                    inputs: Mapping[str, Optional[Tensor]], *, softplus: bool = True,
                    keep: Optional[Sequence[str]] = None) -> ScanRun:
    """Run ``backend`` (a ``selective_scan`` backend name, or a function taking its arguments)
    with ``return_last_state=True`` on fresh leaf copies of ``inputs`` and differentiate the probe
    loss sum(y * linspace(-1, 1, L)) + sum(last_state^2) with respect to every input passed.

    ``keep``: the arguments passed (default: all); the others pass as None. The loss is computed
    in float32 for lower-precision outputs, in y's dtype otherwise. y and the last state come
    back detached.
    """
    if isinstance(backend, str):
        name = backend
        backend = lambda **kw: _scan.selective_scan(**kw, backend=name)  # noqa: E731
    used = {k: v for k, v in inputs.items() if keep is None or k in keep}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in used.items() if v is not None}
    y, last = backend(**{k: leaves.get(k) for k in inputs}, delta_softplus=softplus,
                      return_last_state=True)
    wide = torch.promote_types(y.dtype, torch.float32)
    w = torch.linspace(-1, 1, y.shape[-1], dtype=wide, device=y.device)
    loss = (y.to(wide) * w).sum() + (last.to(wide) ** 2).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return ScanRun(y.detach(), last.detach(), dict(zip(leaves, grads)))


def error_stats(got: Tensor, ref: Tensor) -> dict[str, Union[float, bool]]:
    """In float64: ``max_abs`` = max |got - ref|, ``scale`` = max |ref|, ``max_rel`` =
    max_abs / scale (max_abs itself where the reference is all zeros) and ``finite``: got has no
    inf or NaN."""
    got64, ref64 = got.double(), ref.double()
    diff = (got64 - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    return dict(max_abs=diff, scale=scale, max_rel=diff / scale if scale > 0 else diff,
                finite=bool(torch.isfinite(got64).all()))


def fallbacks() -> dict[str, str]:
    """Kernels that failed at run time and now run as the torch kernel (name -> the error)."""
    return dict(_scan._FALLEN_BACK)
