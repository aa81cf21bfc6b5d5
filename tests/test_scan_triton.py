"""Triton scan v3 (star_mamba.ops.scan_triton) against the reference loop, in Triton's interpreter;
and both kernels lowered ahead of time to an sm_90 cubin, specialised as the JIT would.

The interpreter must be switched on before triton is imported, so the checks run in subprocesses
with TRITON_INTERPRET=1 (this module itself never imports triton). Shapes are tiny: the
interpreter runs every program step by step in Python.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (CPU-only torch build)")
EXTRAS = ("D", "z", "delta_bias")
GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(b, dim, L, N, seed=0, layout="channel", dtype=None, extras=EXTRAS,
                softplus=True):
    """Scan inputs in one of three memory layouts, as the kernel meets them:

    * channel: u, delta, z, dy (b, dim, L)-contiguous, B, C (b, N, L)-contiguous;
    * time: u, delta, z, dy transposed views of (b, L, dim) tensors, B, C of (b, L, N);
    * model: as Mamba feeds it: u channel-major (the conv output), delta time-major, z a slice of
      a (b, L, 2 dim) tensor (not dense), B, C slices of one (b, L, R + 2N) tensor, dy
      time-major.
    -> (dict of selective_scan arguments, dy, dlast); u, delta, z, B, C, dy in ``dtype``. delta
    is a raw N(0, 0.25) for softplus, else positive (the step itself).
    """
    import torch
    from star_mamba.ops.testing import to_layout
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, z, dy = r(b, dim, L), r(b, dim, L), r(b, dim, L)
    delta = 0.5 * (r(b, dim, L) if softplus else torch.rand(b, dim, L, generator=g)) + 0.02
    B, C = r(b, N, L), r(b, N, L)
    # the parts of the wider "model" tensors left out of z, B, C: random (zeros would hide a
    # kernel that reads them)
    x = to_layout(dict(u=u, delta=delta, z=z, B=B, C=C), layout,
                  filler=lambda shape, like: r(*shape))
    u, delta, z, B, C = (x[k] for k in ("u", "delta", "z", "B", "C"))
    if layout != "channel":
        dy = dy.mT.contiguous().mT
    if dtype is not None:
        u, delta, z, dy, B, C = (t.to(dtype) for t in (u, delta, z, dy, B, C))
    A = -(torch.rand(dim, N, generator=g) * 2 + 0.1)
    x = dict(u=u, delta=delta, A=A, B=B, C=C, D=r(dim), z=z, delta_bias=0.3 * r(dim))
    x.update({k: None for k in EXTRAS if k not in extras})
    return x, dy, r(b, dim, N)


def reference(x, dy, dlast, softplus, chunk):
    """y, last, the state entering every chunk (b, n_chunks, dim, N) and the gradients of
    <y, dy> + <last, dlast> (None for absent inputs), all float64."""
    import torch
    from star_mamba.ops.scan_reference import scan_reference
    leaves = {k: None if v is None else v.detach().double().requires_grad_() for k, v in x.items()}
    y, last = scan_reference(**leaves, delta_softplus=softplus, return_last_state=True)
    present = [k for k in GRADS if leaves[k] is not None]
    grads = torch.autograd.grad((y * dy.double()).sum() + (last * dlast.double()).sum(),
                                [leaves[k] for k in present])
    grads = dict(zip(present, grads))
    L = x["u"].shape[2]
    entering = [torch.zeros_like(last)]
    with torch.no_grad():
        for j in range(1, -(-L // chunk)):
            cut = {k: v[..., :j * chunk] if v is not None and v.ndim == 3 else v
                   for k, v in leaves.items()}
            entering.append(scan_reference(**cut, delta_softplus=softplus,
                                           return_last_state=True)[1])
    return y.detach(), last.detach(), torch.stack(entering, 1), [grads.get(k) for k in GRADS]


def _close(actual, expected, tol, msg):
    import torch
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=msg)


def _run(st, x, dy, dlast, softplus, **params):
    y, last, ckpt = st.forward(**x, delta_softplus=softplus,
                               **{k: v for k, v in params.items() if k != "sub"})
    grads = st.backward(x["u"], x["delta"], x["A"], x["B"], x["C"], ckpt, dy, dlast, D=x["D"],
                        z=x["z"], delta_bias=x["delta_bias"], delta_softplus=softplus,
                        **{k: v for k, v in params.items() if k != "steps"})
    return y, last, ckpt, grads


CONFIGS = [  # (b, dim, L, N, layout, extras, softplus, params)
    (2, 5, 13, 8, "channel", EXTRAS, True, dict(chunk=8, steps=4, sub=2)),  # L 13: ragged chunk
    (2, 40, 19, 16, "time", EXTRAS, True, dict(chunk=8, steps=8, sub=2)),  # 2 blocks, 1 partial
    (1, 33, 9, 24, "model", EXTRAS, True, dict(chunk=8, steps=4, sub=4)),  # N 24 padded to 32
    (1, 6, 70, 4, "channel", (), False, {}),  # the module defaults: 2 chunks, no extras
    (1, 8, 3, 16, "time", ("D",), False, dict(chunk=4, steps=4, sub=2)),  # L < steps
]


def _check_against_reference():
    """Every output and gradient, their dtypes and strides, for the layouts and ragged shapes of
    CONFIGS, against the float64 reference."""
    import torch
    from star_mamba.ops import scan_triton as st
    for i, (b, dim, L, N, layout, extras, softplus, params) in enumerate(CONFIGS):
        x, dy, dlast = scan_inputs(b, dim, L, N, seed=i, layout=layout, extras=extras,
                                   softplus=softplus)
        where = f"config {i}: {CONFIGS[i]}"
        y, last, ckpt, grads = _run(st, x, dy, dlast, softplus, **params)
        chunk = params.get("chunk", st.CHUNK)
        y_r, last_r, entering_r, grads_r = reference(x, dy, dlast, softplus, chunk)
        assert y.dtype == last.dtype == ckpt.dtype == torch.float32, where
        assert y.stride() == (L * dim, 1, dim), (where, y.stride())  # stored time-major
        assert tuple(last.shape) == (b, dim, N), where
        assert tuple(ckpt.shape) == st.saved_shape(b, dim, L, N, chunk), where
        _close(y, y_r, 1e-5, f"y {where}")
        _close(last, last_r, 1e-5, f"last {where}")
        _close(ckpt[:, :, :N, :dim].transpose(2, 3), entering_r, 1e-5, f"checkpoints {where}")
        assert not ckpt[:, :, N:].any() and not ckpt[..., dim:].any(), f"padding {where}"
        for name, g, g_r in zip(GRADS, grads, grads_r):
            t = x[name]
            if t is None:
                assert g is None and g_r is None, f"{name} {where}"
                continue
            assert g.shape == t.shape and g.dtype == t.dtype, f"{name} {where}"
            assert g.stride() == torch.empty_like(t).stride(), f"{name} strides {where}"
            assert torch.isfinite(g).all(), f"{name} {where}"
            _close(g, g_r, 1e-4, f"d{name} {where}")
    print("reference ok")


def _check_low_precision():
    """bf16 / fp16 inputs are upcast on load: the result is the float32 result on the same
    (rounded) values, rounded once to the output dtype; float32 gradients stay float32."""
    import torch
    from star_mamba.ops import scan_triton as st
    params = dict(chunk=8, steps=4, sub=2)
    for dtype in (torch.bfloat16, torch.float16):
        x, dy, dlast = scan_inputs(2, 5, 11, 8, seed=10, layout="model", dtype=dtype)
        up = {k: None if v is None else v.float() for k, v in x.items()}
        y, last, ckpt, grads = _run(st, x, dy, dlast, True, **params)
        y_up, last_up, ckpt_up, grads_up = _run(st, up, dy.float(), dlast, True, **params)
        assert y.dtype == dtype and last.dtype == ckpt.dtype == torch.float32, dtype
        torch.testing.assert_close(y, y_up.to(dtype), msg=f"y {dtype}")
        torch.testing.assert_close(ckpt, ckpt_up, msg=f"checkpoints {dtype}")
        for name, g, g_up in zip(GRADS, grads, grads_up):
            assert g.dtype == x[name].dtype, (name, dtype)
            torch.testing.assert_close(g, g_up.to(g.dtype), msg=f"d{name} {dtype}")
    print("low precision ok")


def _check_memory_and_determinism():
    """Nothing of size b*dim*L*N is saved or allocated; the backward is bit-reproducible."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from star_mamba.ops import scan_triton as st
    b, dim, N, chunk = 2, 32, 8, 4  # a full block: no channel padding
    L = 8 * chunk + 1
    x, dy, dlast = scan_inputs(b, dim, L, N, seed=20)
    full_bytes = 4 * b * dim * L * N  # one float32 state per step

    class Allocations(TorchDispatchMode):  # the bytes of every tensor torch produces
        def __init__(self):
            super().__init__()
            self.nbytes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.nbytes.append(t.numel() * t.element_size())
            return out

    params = dict(chunk=chunk, steps=4, sub=2)
    with Allocations() as allocs:
        first = _run(st, x, dy, dlast, True, **params)
    ckpt = first[2]
    assert 4 * ckpt.numel() < full_bytes / 2, (ckpt.shape, full_bytes)
    assert allocs.nbytes and max(allocs.nbytes) < full_bytes, (max(allocs.nbytes), full_bytes)
    again = _run(st, x, dy, dlast, True, **params)
    for name, g1, g2 in zip(GRADS, first[3], again[3]):
        assert torch.equal(g1, g2), f"d{name} differs between two identical backward calls"
    print("memory and determinism ok")


def _check_dispatcher():
    """Through selective_scan: the fused custom ops pass torch.library.opcheck (schema, fake
    tensors with the real strides, autograd, AOT dispatch), and a kernel failure in the forward
    or the backward falls back to the torch kernel, with the same results and strides."""
    import warnings
    import torch
    from star_mamba.ops import scan, scan_triton, selective_scan
    x, dy, dlast = scan_inputs(2, 6, 9, 4, seed=30, layout="model", dtype=torch.bfloat16)
    args = [x[k] for k in GRADS]
    torch.library.opcheck(scan.scan_fused_fwd, (*[t.detach().requires_grad_() for t in args],
                                                True, "triton"))
    torch.library.opcheck(scan.scan_fused_fwd, (*args[:5], None, None, None, False, "triton"))

    def run():
        leaves = {k: x[k].detach().requires_grad_() for k in GRADS}
        y, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True,
                                 backend="triton")
        loss = (y.float() * dy.float()).sum() + (last.float() * dlast).sum()
        return y, torch.autograd.grad(loss, list(leaves.values()))

    y_ok, grads_ok = run()
    for stage in ("forward", "backward"):
        kernel = getattr(scan_triton, stage)

        def broken(*a, **k):
            raise RuntimeError("simulated launch failure")

        setattr(scan_triton, stage, broken)
        scan._FALLEN_BACK.clear()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y, grads = run()
        finally:
            setattr(scan_triton, stage, kernel)
            scan._FALLEN_BACK.clear()
        assert [str(w.message) for w in caught if f"failed in its {stage}" in str(w.message)]
        assert y.stride() == y_ok.stride() and y.dtype == y_ok.dtype, stage
        torch.testing.assert_close(y, y_ok, msg=stage)
        for name, g, g_ok in zip(GRADS, grads, grads_ok):
            assert g.dtype == g_ok.dtype and g.stride() == g_ok.stride(), (stage, name)
            torch.testing.assert_close(g.float(), g_ok.float(), rtol=2e-2, atol=2e-2,
                                       msg=f"{stage} d{name}")
    print("dispatcher ok")


def interpreter_checks(which):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for name in which.split(","):
        globals()[f"_check_{name}"]()
    print("interpreter checks ok")


def _subprocess(code, env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@needs_triton
@pytest.mark.parametrize("which", ["against_reference", "low_precision,memory_and_determinism",
                                   "dispatcher"])
def test_triton_v3_in_the_interpreter(which):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = _subprocess("import sys, os; sys.path.insert(0, os.getcwd()); "
                      "from tests.test_scan_triton import interpreter_checks; "
                      f"interpreter_checks({which!r})", env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "interpreter checks ok" in out.stdout


# ----------------------------------------------------------------------------- ahead of time

class _Capture:
    """Stands in for a JITFunction: records the arguments of ``kernel[grid](...)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _compile_as_jit(kernel, args, kwargs):
    """Compile ``kernel`` for an H100/H200 (sm_90) with the specialisation the JIT derives from
    these arguments (ints equal to 1 or divisible by 16, pointer alignment, do_not_specialize)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"debug": False, **kwargs}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def _sass_ops(cubin: bytes, tmp: Path) -> list[str]:
    """Opcodes of the cubin's SASS (cuobjdump, shipped with Triton), or [] without it."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists() and shutil.which("cuobjdump") is None:
        return []
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([str(tool) if tool.exists() else "cuobjdump", "-sass", str(path)],
                          capture_output=True, text=True, check=True).stdout
    import re
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)


AOT_CASES = [  # (name, b, dim, L, N, layout, dtype, extras, softplus, register cap, lean)
    # lean: the forward's SASS must move no data between lanes (asserted for the shapes that
    # matter; ragged ones may use a shuffle or shared memory, and only have to compile)
    ("model layout, bf16, everything fused", 2, 768, 624, 16, "model", "bfloat16", EXTRAS, True,
     True, True),
    ("channel-major, bf16, fused", 2, 192, 144, 16, "channel", "bfloat16", EXTRAS, True, False,
     True),
    ("channel-major, fp32, core only, ragged", 2, 40, 130, 24, "channel", None, (), False, False,
     False),
    ("time-major, fp16, D only, ragged", 2, 72, 257, 12, "time", "float16", ("D",), False, False,
     False),
]


def compile_for_sm90(tmp):
    """Lower both kernels for each AOT case, with the arguments the wrappers really pass."""
    import torch
    from star_mamba.ops import scan_triton as st
    tmp = Path(tmp)
    for name, b, dim, L, N, layout, dtype, extras, softplus, cap, lean in AOT_CASES:
        x, dy, dlast = scan_inputs(b, dim, L, N, layout=layout, extras=extras, softplus=softplus,
                                   dtype=None if dtype is None else getattr(torch, dtype))
        kernels = (st._forward_kernel, st._backward_kernel)
        captured = st._forward_kernel, st._backward_kernel = _Capture(), _Capture()
        try:
            y, last, ckpt = st.forward(**x, delta_softplus=softplus)
            ckpt = torch.zeros(st.saved_shape(b, dim, L, N))
            st.backward(x["u"], x["delta"], x["A"], x["B"], x["C"], ckpt, dy, dlast, D=x["D"],
                        z=x["z"], delta_bias=x["delta_bias"], delta_softplus=softplus)
        finally:
            st._forward_kernel, st._backward_kernel = kernels
        for kernel, capture in zip(kernels, captured):
            (args, kwargs), = capture.calls
            if kernel is st._backward_kernel and cap:  # as _backward_options sets it on a GPU
                kwargs = {**kwargs, "maxnreg": st.BWD_MAXNREG}
            compiled = _compile_as_jit(kernel, args, kwargs)
            where = f"{kernel.__name__}, {name}"
            assert compiled.asm["cubin"], where
            assert "i64" in compiled.asm["ttir"], f"offsets are expected to be 64-bit: {where}"
            ops = _sass_ops(compiled.asm["cubin"], tmp)
            if ops and lean and kernel is st._forward_kernel:  # the plan: a channel per lane
                bad = sorted({op for op in ops if op.startswith(("SHFL", "BAR", "STS", "LDS"))})
                assert not bad, f"{where}: the forward moves data between lanes: {bad}"
            if ops and kernel is st._backward_kernel:
                assert any(op.startswith("SHFL") for op in ops), where  # sums over channels
            print("compiled", where, len(ops), "instructions")
    print("compile ok")


@needs_triton
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """Importing needs no GPU and no interpreter; both kernels lower to an sm_90 cubin for every
    AOT case, and the forward's SASS moves no data between lanes (no shuffles, no shared
    memory) - what makes it fast."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a fresh cache: really compile
    out = _subprocess("import sys, os; sys.path.insert(0, os.getcwd()); "
                      "from tests.test_scan_triton import compile_for_sm90; "
                      f"compile_for_sm90({str(tmp_path)!r})", env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "compile ok" in out.stdout
