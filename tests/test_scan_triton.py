"""Triton scan v2 (star_mamba.ops.scan_triton) against the reference loop, in Triton's interpreter.

The interpreter must be switched on before triton is imported, so the checks run in one
subprocess with TRITON_INTERPRET=1 (this module itself never imports triton). Shapes are tiny:
the interpreter runs every program step by step in Python.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (CPU-only torch build)")


def _inputs(b, dim, L, N, seed, dtype=None):
    """u, delta (b, dim, L); A (dim, N) f32; B, C (b, N, L); dy (b, dim, L); dlast (b, dim, N)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, B, C = r(b, dim, L), r(b, N, L), r(b, N, L)
    delta = torch.rand(b, dim, L, generator=g) * 0.5 + 0.02
    A = -(torch.rand(dim, N, generator=g) * 2 + 0.1)
    dy, dlast = r(b, dim, L), r(b, dim, N)
    if dtype is not None:
        u, delta, B, C = (t.to(dtype) for t in (u, delta, B, C))
    return u, delta, A, B, C, dy, dlast


def _reference(u, delta, A, B, C, dy, dlast, chunk):
    """y, last, checkpoints and the five gradients of <y, dy> + <last, dlast>, in float64."""
    import torch
    from star_mamba.ops.scan_reference import scan_reference
    leaves = [t.detach().double().requires_grad_() for t in (u, delta, A, B, C)]
    y, last = scan_reference(*leaves, return_last_state=True)
    grads = torch.autograd.grad((y * dy.double()).sum() + (last * dlast.double()).sum(), leaves)
    b, dim, L = u.shape
    ckpts = [torch.zeros(b, dim, A.shape[1], dtype=torch.float64)]  # the state entering chunk 0
    for j in range(1, -(-L // chunk)):
        with torch.no_grad():
            ckpts.append(scan_reference(*(t[..., :j * chunk] if t.ndim == 3 else t
                                          for t in leaves), return_last_state=True)[1])
    return y.detach(), last.detach(), torch.stack(ckpts, 2), grads


def _close(actual, expected, tol, msg):
    import torch
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol, msg=msg)


GRADS = ("du", "ddelta", "dA", "dB", "dC")


def _check_against_reference():
    """Forward outputs, checkpoints and gradients for d_state 8, 16, 24 and ragged shapes."""
    import torch
    from star_mamba.ops import scan_triton as st
    configs = [  # (b, dim, L, N, chunk, block_d): dim 5 is not a multiple of block_d 4
        (2, 5, 13, 8, 4, 4),  # L = 13 is not a multiple of the chunk
        (2, 5, 3, 16, 4, 4),  # L < chunk: one partial chunk
        (2, 5, 13, 24, 4, 4),  # d_state not a power of two (padded to 32, masked)
        (2, 5, 13, 16, st.CHUNK, st.BLOCK_D),  # the module defaults
    ]
    for i, (b, dim, L, N, chunk, block_d) in enumerate(configs):
        u, delta, A, B, C, dy, dlast = _inputs(b, dim, L, N, seed=i)
        y, last, ckpt = st.forward(u, delta, A, B, C, chunk=chunk, block_d=block_d)
        y_r, last_r, ckpt_r, grads_r = _reference(u, delta, A, B, C, dy, dlast, chunk)
        where = f"(b, dim, L, N, chunk, block_d) = {(b, dim, L, N, chunk, block_d)}"
        assert y.dtype == last.dtype == ckpt.dtype == torch.float32, where
        assert tuple(y.shape) == (b, dim, L) and tuple(last.shape) == (b, dim, N), where
        assert tuple(ckpt.shape) == st.saved_shape(b, dim, L, N, chunk) \
            == (b, dim, -(-L // chunk), N), where
        _close(y, y_r, 1e-5, f"y {where}")
        _close(last, last_r, 1e-5, f"last {where}")
        _close(ckpt, ckpt_r, 1e-5, f"checkpoints {where}")
        grads = st.backward(u, delta, A, B, C, ckpt, dy, dlast, chunk=chunk, block_d=block_d)
        for name, g, g_r, x in zip(GRADS, grads, grads_r, (u, delta, A, B, C)):
            assert g.shape == x.shape and g.dtype == torch.float32, f"{name} {where}"
            assert g.is_contiguous(), f"{name} {where}"
            assert torch.isfinite(g).all(), f"{name} {where}"
            _close(g, g_r, 1e-4, f"{name} {where}")
    print("reference ok")


def _check_low_precision():
    """bf16 / fp16 inputs: float32 outputs close to the float32 run, gradients in input dtype."""
    import torch
    from star_mamba.ops import scan_triton as st
    b, dim, L, N, chunk, block_d = 2, 5, 9, 8, 4, 4
    u, delta, A, B, C, dy, dlast = _inputs(b, dim, L, N, seed=10)
    y32, last32, _ = st.forward(u, delta, A, B, C, chunk=chunk, block_d=block_d)
    for dtype in (torch.bfloat16, torch.float16):
        lo = [t.to(dtype) for t in (u, delta, B, C)]
        up = [t.float() for t in lo]  # the same rounded values, in float32
        ul, dl, Bl, Cl = lo
        y, last, ckpt = st.forward(ul, dl, A, Bl, Cl, chunk=chunk, block_d=block_d)
        assert y.dtype == last.dtype == ckpt.dtype == torch.float32, dtype
        _close(y, y32, 0.05, f"y {dtype} vs float32 inputs")
        _close(last, last32, 0.05, f"last {dtype} vs float32 inputs")
        # upcast on load, float32 math: identical to feeding the upcast values
        y_up, last_up, ckpt_up = st.forward(up[0], up[1], A, up[2], up[3], chunk=chunk,
                                            block_d=block_d)
        _close(y, y_up, 1e-6, f"y {dtype} vs its upcast")
        _close(ckpt, ckpt_up, 1e-6, f"checkpoints {dtype} vs its upcast")
        grads = st.backward(ul, dl, A, Bl, Cl, ckpt, dy, dlast, chunk=chunk, block_d=block_d)
        grads_up = st.backward(up[0], up[1], A, up[2], up[3], ckpt_up, dy, dlast, chunk=chunk,
                               block_d=block_d)
        for name, g, g_up, x in zip(GRADS, grads, grads_up, (ul, dl, A, Bl, Cl)):
            assert g.dtype == (torch.float32 if name == "dA" else dtype) == x.dtype, (name, dtype)
            assert g.shape == x.shape, (name, dtype)
            # the float32 gradient, rounded once to the output dtype
            torch.testing.assert_close(g, g_up.to(g.dtype), msg=f"{name} {dtype}")
    print("low precision ok")


def _check_memory_and_determinism():
    """Nothing of size b*dim*L*N is saved or allocated; dA, dB, dC are bit-reproducible."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from star_mamba.ops import scan_triton as st
    b, dim, N, chunk, block_d = 2, 5, 8, 4, 4
    L = 4 * chunk + 1
    full = b * dim * L * N  # the size v1 saved: one state per step
    u, delta, A, B, C, dy, dlast = _inputs(b, dim, L, N, seed=20)

    full_bytes = 4 * full  # in float32

    class Allocations(TorchDispatchMode):  # records the bytes of every tensor torch produces
        def __init__(self):  # (the interpreter's own host copies show up as uint8 views)
            super().__init__()
            self.nbytes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.nbytes.append(t.numel() * t.element_size())
            return out

    with Allocations() as fwd_allocs:
        y, last, ckpt = st.forward(u, delta, A, B, C, chunk=chunk, block_d=block_d)
    n_chunks = -(-L // chunk)
    assert ckpt.numel() == b * dim * n_chunks * N, ckpt.shape
    assert 3 * ckpt.numel() < full, (ckpt.numel(), full)  # 5 chunks for 17 steps
    assert fwd_allocs.nbytes and max(fwd_allocs.nbytes) < full_bytes, \
        (max(fwd_allocs.nbytes), full_bytes)

    # the backward's scratch holds one chunk per program, whatever the sequence length
    shape = st._scratch_shape(b, dim, N, chunk, block_d)
    assert shape == (b, -(-dim // block_d), chunk, block_d, 8), shape
    assert st._scratch_shape(b, dim, 24, chunk, block_d)[-1] == 32  # padded d_state
    with Allocations() as bwd_allocs:
        grads = st.backward(u, delta, A, B, C, ckpt, dy, dlast, chunk=chunk, block_d=block_d)
    assert 4 * torch.Size(shape).numel() in bwd_allocs.nbytes, "scratch not allocated"
    assert max(bwd_allocs.nbytes) < full_bytes, (max(bwd_allocs.nbytes), full_bytes)

    again = st.backward(u, delta, A, B, C, ckpt, dy, dlast, chunk=chunk, block_d=block_d)
    for name, g1, g2 in zip(GRADS, grads, again):
        assert torch.equal(g1, g2), f"{name} differs between two identical backward calls"
    print("memory and determinism ok")


def interpreter_checks():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _check_against_reference()
    _check_low_precision()
    _check_memory_and_determinism()
    print("triton v2 ok")


def _run(code, env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@needs_triton
def test_triton_v2_matches_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = _run("import sys, os; sys.path.insert(0, os.getcwd()); "
               "from tests.test_scan_triton import interpreter_checks; interpreter_checks()", env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "triton v2 ok" in out.stdout


def compile_for_sm90():
    """Lower both kernels ahead of time to an H100 (sm_90) cubin: no GPU needed, only ptxas.

    The interpreter accepts some programs the compiler rejects; this catches those.
    """
    assert "TRITON_INTERPRET" not in os.environ
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from star_mamba.ops import scan_triton as st
    assert st.saved_shape(2, 3, 130, 16) == (2, 3, 3, 16) and (st.CHUNK, st.BLOCK_D) == (64, 32)
    inp = {k: "*bf16" for k in ("u_ptr", "delta_ptr", "B_ptr", "C_ptr")}
    f32 = lambda *names: {k: "*fp32" for k in names}  # noqa: E731
    i32 = lambda *names: {k: "i32" for k in names}  # noqa: E731
    const = {"NP": 32, "CHUNK": st.CHUNK, "BLOCK_D": st.BLOCK_D}  # d_state 24, padded
    fwd = {**inp, **f32("A_ptr", "y_ptr", "last_ptr", "ckpt_ptr"),
           **i32("DIM", "L", "N", "N_CHUNKS"), **{k: "constexpr" for k in const}}
    bwd = {**inp, **f32("A_ptr", "ckpt_ptr", "dy_ptr", "dlast_ptr", "scratch_ptr"),
           "du_ptr": "*bf16", "ddelta_ptr": "*bf16", **f32("dA_ptr", "dB_ptr", "dC_ptr"),
           **i32("BATCH", "DIM", "L", "N", "N_CHUNKS", "N_DBLOCKS"),
           **{k: "constexpr" for k in const}}
    for kernel, sig in ((st._forward_kernel, fwd), (st._backward_kernel, bwd)):
        assert set(sig) == set(kernel.arg_names), (sorted(sig), kernel.arg_names)
        sig = {k: sig[k] for k in kernel.arg_names}  # in the kernel's argument order
        compiled = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel
        assert "i64" in compiled.asm["ttir"], "offsets are expected to be 64-bit"
    print("compile ok")


@needs_triton
def test_module_imports_and_kernels_compile_without_a_gpu(tmp_path):
    """Importing needs no GPU and no interpreter; both kernels lower to an sm_90 cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile
    out = _run("import sys, os; sys.path.insert(0, os.getcwd()); "
               "from tests.test_scan_triton import compile_for_sm90; compile_for_sm90()", env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "compile ok" in out.stdout
