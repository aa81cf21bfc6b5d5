"""Every selective-scan backend agrees with the reference loop, forward and backward."""
import importlib.util
import re
import subprocess
import warnings
import sys
from pathlib import Path

import pytest
import torch

from star_mamba.ops import available_backends, selective_scan
from star_mamba.ops.testing import scan_inputs, scan_with_grads

FAST = [b for b in available_backends("cpu") if b not in ("reference", "triton")]
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
CORE = ARGS[:5]


def make_inputs(dtype, stress=False, b=2, d=6, n=4, L=17, seed=0):
    """Scan inputs on CPU, every one in ``dtype``; ``stress``: steps large enough that exp(delta A)
    underflows."""
    return scan_inputs(b, d, L, n, dtype=dtype, param_dtype=dtype, seed=seed, stress=stress)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("stress", [False, True])
@pytest.mark.parametrize("keep,softplus", [(ARGS, True), (CORE, False), (CORE + ("D",), False),
                                           (CORE + ("z", "delta_bias"), True)])
def test_backend_matches_reference(backend, dtype, tol, stress, keep, softplus):
    inputs = make_inputs(dtype, stress)
    y_ref, last_ref, g_ref = scan_with_grads("reference", inputs, softplus=softplus, keep=keep)
    y, last, g = scan_with_grads(backend, inputs, softplus=softplus, keep=keep)
    assert y.dtype == dtype and y.shape == (2, 6, 17) and last.shape == (2, 6, 4)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(last, last_ref, rtol=tol, atol=tol)
    assert set(g) == set(g_ref) == {k for k in keep if inputs[k] is not None}
    for name in g_ref:
        assert torch.isfinite(g[name]).all(), name
        torch.testing.assert_close(g[name], g_ref[name], rtol=tol, atol=tol * 10, msg=name)


def test_reference_matches_explicit_recurrence():
    x = make_inputs(torch.float64, L=5)
    u, delta, A, B, C = (x[k] for k in ("u", "delta", "A", "B", "C"))
    h = torch.zeros(2, 6, 4, dtype=torch.float64)
    for t in range(5):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
    y, last = selective_scan(u, delta, A, B, C, return_last_state=True, backend="reference")
    torch.testing.assert_close(last, h)
    torch.testing.assert_close(y[:, :, -1], (h * C[:, None, :, -1]).sum(-1))


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck(backend):
    x = make_inputs(torch.float64, b=1, d=2, n=2, L=4)
    args = [x[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "C", "D", "z")]
    assert torch.autograd.gradcheck(
        lambda *a: selective_scan(*a, delta_softplus=True, backend=backend), args)


@pytest.mark.parametrize("backend", FAST)
def test_bf16_inputs_give_bf16_close_to_float32(backend):
    x = make_inputs(torch.float32)
    ref = selective_scan(**x, delta_softplus=True, backend=backend)
    y = selective_scan(**{k: v.bfloat16() if v is not None else None for k, v in x.items()},
                       delta_softplus=True, backend=backend)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


def test_auto_on_cpu_is_the_fused_numba_kernel():
    from star_mamba.ops.scan import default_backend, resolve_backend
    assert default_backend("cpu") == resolve_backend("auto", "cpu") == "numba"  # a dependency
    x = make_inputs(torch.float64)
    auto = selective_scan(**x, backend="auto")
    assert torch.equal(auto, selective_scan(**x, backend="numba"))
    torch.testing.assert_close(auto, selective_scan(**x, backend="reference"))
    assert "reference" in available_backends("cpu") and "torch" in available_backends("cpu")
    assert "cuda" not in available_backends("cpu")


@pytest.mark.parametrize("name,bad,expected", [
    ("delta", (2, 6, 16), (2, 6, 17)), ("B", (2, 3, 17), (2, 4, 17)), ("C", (1, 4, 17), (2, 4, 17)),
    ("z", (2, 5, 17), (2, 6, 17)), ("D", (6, 1), (6,)), ("delta_bias", (5,), (6,))])
def test_shape_mismatch_names_argument_received_and_expected(name, bad, expected):
    x = make_inputs(torch.float32)
    x[name] = torch.zeros(bad)
    with pytest.raises(ValueError, match=rf"^{name} must have shape {re.escape(str(expected))}, "
                                         rf"got {re.escape(str(bad))}$"):
        selective_scan(**x)


def per_channel(t, b, d, L):
    """B or C in any of mamba-ssm's forms, by hand -> (b, d, N, L): the values channel c reads."""
    if t.ndim == 2:  # constant (d, N)
        return t[None, :, :, None].expand(b, d, t.shape[1], L)
    if t.ndim == 3:  # (b, N, L) shared by every channel
        return t[:, None].expand(b, d, *t.shape[1:])
    return t.repeat_interleave(d // t.shape[1], dim=1)  # (b, G, N, L): G groups of d / G channels


def scan_channel_by_channel(u, delta, A, B, C, D=None, z=None, delta_bias=None, **kw):
    """The reference run once per channel, that channel's B and C as (b, N, L): the semantics of
    grouped and constant B / C spelled out."""
    b, d, L = u.shape
    Bc, Cc = per_channel(B, b, d, L), per_channel(C, b, d, L)
    pick = lambda t, c: None if t is None else t[c:c + 1] if t.ndim == 1 else t[:, c:c + 1]  # noqa: E731
    outs = [selective_scan(pick(u, c), pick(delta, c), A[c:c + 1], Bc[:, c], Cc[:, c], pick(D, c),
                           pick(z, c), pick(delta_bias, c), backend="reference", **kw)
            for c in range(d)]
    return tuple(torch.cat(parts, dim=1) for parts in zip(*outs))


def b_c_forms(x, seed=1):
    """x (make_inputs, b=2, d=6, n=4, L=17) with B and C in other forms, drawn from one generator."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=x["u"].dtype)  # noqa: E731
    return {"variable": x["B"], "groups2": draw(2, 2, 4, 17), "groups3": draw(2, 3, 4, 17),
            "groups6": draw(2, 6, 4, 17), "constant": draw(6, 4)}


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("form_b,form_c", [("groups2", "groups2"), ("groups3", "variable"),
                                           ("groups2", "groups3"), ("constant", "constant"),
                                           ("variable", "constant"), ("groups6", "constant")])
def test_grouped_and_constant_b_c_match_the_channel_by_channel_reference(backend, form_b, form_c):
    """mamba-ssm's other B / C shapes: (batch, G, N, L), channel c reading group c // (dim / G),
    and (dim, N), constant over batch and time; y, last state and every gradient."""
    x = make_inputs(torch.float64)
    forms = b_c_forms(x)
    x = {**x, "B": forms[form_b], "C": forms[form_c] * 0.5}
    y_ref, last_ref, g_ref = scan_with_grads(scan_channel_by_channel, x)
    y, last, g = scan_with_grads(backend, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    assert set(g) == set(g_ref)
    for name in g_ref:
        assert g[name].shape == x[name].shape, name
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-9, msg=name)


@pytest.mark.parametrize("name,bad,message", [
    ("B", (2, 4, 4, 17), r"B has 4 groups \(shape \(2, 4, 4, 17\)\), which must divide dim=6"),
    ("C", (2, 2, 3, 17), r"C must have shape \(2, 2, 4, 17\) \(batch, groups, N, L\), got \(2, 2, 3, 17\)"),
    ("B", (6, 5), r"B must have shape \(6, 4\) \(dim, N\), got \(6, 5\)"),
    ("C", (1, 2, 6, 4, 17), r"C must be \(batch, N, L\), \(batch, groups, N, L\) or \(dim, N\), "
                            r"got shape \(1, 2, 6, 4, 17\)")])
def test_bad_b_c_forms_name_the_shape(name, bad, message):
    x = make_inputs(torch.float32)
    x[name] = torch.zeros(bad)
    with pytest.raises(ValueError, match=rf"^{message}$"):
        selective_scan(**x)


@pytest.mark.parametrize("name", ["A", "B", "u"])
def test_complex_inputs_are_refused_in_one_line(name):
    x = make_inputs(torch.float32)
    x[name] = x[name].to(torch.complex64)
    with pytest.raises(ValueError, match=rf"^{name} is complex \(torch.complex64\); "
                                         r"selective_scan supports real inputs only$"):
        selective_scan(**x)


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_last_state_is_float32_as_mamba_ssm_returns_it(backend):
    """y comes back in u's dtype, the last state in the compute dtype: float32 for bf16 / fp16 /
    float32 inputs (mamba-ssm keeps its states in float32), float64 for float64."""
    x = make_inputs(torch.float32)
    _, last32 = selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)
    for dtype in (torch.bfloat16, torch.float16):
        low = {k: None if v is None else v.to(dtype) for k, v in x.items()}
        y, last = selective_scan(**low, delta_softplus=True, return_last_state=True, backend=backend)
        assert y.dtype == dtype and last.dtype == torch.float32
        torch.testing.assert_close(last, last32, rtol=0.05, atol=0.05)
    x64 = make_inputs(torch.float64)
    assert selective_scan(**x64, return_last_state=True, backend=backend)[1].dtype == torch.float64


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_last_state_is_a_plain_output(backend):
    """The last state is an ordinary tensor: modifying it in place (say, as a cache) is allowed."""
    x = make_inputs(torch.float32)
    u = x["u"].clone().requires_grad_()
    y, last = selective_scan(**{**x, "u": u}, delta_softplus=True, return_last_state=True,
                             backend=backend)
    torch.testing.assert_close(y, selective_scan(**x, delta_softplus=True, backend=backend))
    last.mul_(2)
    (y.sum() + last.sum()).backward()
    assert torch.isfinite(u.grad).all()


def test_bad_inputs_raise_clear_errors():
    x = make_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"B must have shape \(2, 4, 17\), got \(2, 4, 16\)"):
        selective_scan(**{**x, "B": x["B"][..., :16]})
    with pytest.raises(ValueError, match=r"u must be \(batch, dim, L\), got shape \(2, 6\)"):
        selective_scan(**{**x, "u": x["u"][..., 0]})
    with pytest.raises(ValueError, match=r"A must be \(dim, N\) = \(6, N\), got shape \(3, 4\)"):
        selective_scan(**{**x, "A": x["A"][:3]})
    with pytest.raises(ValueError, match="unknown selective-scan backend 'triton2'"):
        selective_scan(**x, backend="triton2")
    with pytest.raises(RuntimeError, match="backend 'cuda' needs"):
        selective_scan(**x, backend="cuda")


TRITON_CHECK = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.getcwd())
import warnings
import torch
from star_mamba.ops.testing import scan_with_grads
from tests.test_selective_scan import make_inputs
warnings.simplefilter("error")  # a fallback to the torch scan would warn: the kernel itself must run
for stress in (False, True):
    x = make_inputs(torch.float32, stress, b=2, d=40, n=4, L=9)  # 40 channels: 2 blocks, one partial
    y_ref, last_ref, g_ref = scan_with_grads("reference", x)
    y, last, g = scan_with_grads("triton", x)
    torch.testing.assert_close(y, y_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(last, last_ref, rtol=2e-5, atol=2e-5)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=2e-5, atol=2e-4, msg=k)
print("triton ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_matches_reference_in_the_interpreter():
    """The GPU kernel's logic, run by Triton's CPU interpreter (no GPU needed)."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "triton ok" in out.stdout


@pytest.mark.parametrize("backend", FAST)
def test_nan_in_the_input_reaches_the_output(backend):
    """Fast paths must not hide bad data: the training loop relies on NaN reaching the loss."""
    x = make_inputs(torch.float32)
    x["u"][0, 1, 3] = float("nan")
    y = selective_scan(**x, delta_softplus=True, backend=backend)
    assert torch.isnan(y[0, 1, 3:]).all() and torch.isfinite(y[1]).all()


TRITON_MEMORY_CHECK = r"""
import os, sys, warnings
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.getcwd())
import torch
from star_mamba.ops import scan, scan_triton
from tests.test_selective_scan import make_inputs
warnings.simplefilter("error")
x = make_inputs(torch.float32, b=1, d=16, n=16, L=2 * scan_triton.CHUNK + 3)
b, d, L = x["u"].shape
n = x["A"].shape[1]
input_bytes = sum(t.numel() * t.element_size() for t in x.values() if t is not None)
for backend in ("triton", "torch"):
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
    saved = []
    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = scan.selective_scan(**leaves, delta_softplus=True, backend=backend)
    # distinct storages: autograd saves some tensors more than once
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    biggest = max(t.numel() for t in saved)
    print(backend, "saved/input bytes", round(sum(storages.values()) / input_bytes, 2),
          "largest saved", biggest, "b*d*L*N", b * d * L * n)
    if backend == "triton":
        assert sum(storages.values()) <= 3 * input_bytes, storages
        assert biggest < b * d * L * n
        y.sum().backward()  # the saved tensors are enough for the backward
# the torch fallback's states give the same checkpoints as the Triton forward
u, delta = x["u"].contiguous(), torch.nn.functional.softplus(x["delta"] + x["delta_bias"][:, None])
args = (u, delta.contiguous(), x["A"], x["B"], x["C"])
_, _, ckpt = scan_triton.forward(*args)
_, _, hs = scan.load_kernel("torch").forward(*args)
torch.testing.assert_close(scan._triton_checkpoints(hs, scan_triton.CHUNK), ckpt, rtol=1e-5, atol=1e-6)
print("memory ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_keeps_no_per_step_state_for_backward():
    """Through the dispatcher and its custom op, the Triton backend saves a small multiple of the
    inputs for the backward (one state per chunk), where the torch kernel keeps every state."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", TRITON_MEMORY_CHECK], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "memory ok" in out.stdout
    torch_line = next(line for line in out.stdout.splitlines() if line.startswith("torch"))
    assert float(torch_line.split()[3]) > 4  # the check above can fail: torch keeps every state


@pytest.mark.skipif("numba" not in FAST, reason="numba is not available")
@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_failing_kernel_falls_back_to_torch_with_one_warning(monkeypatch, stage):
    from star_mamba.ops import scan
    kernel = scan.load_kernel("numba")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(kernel, stage, broken)
    monkeypatch.setattr(scan, "_FALLEN_BACK", {})
    x = make_inputs(torch.float64)
    y_ref, last_ref, g_ref = scan_with_grads("reference", x)
    with pytest.warns(UserWarning, match=f"numba selective scan failed in its {stage}.*simulated"):
        y, last, g = scan_with_grads("numba", x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls are quiet
        scan_with_grads("numba", x)


@pytest.mark.skipif("numba" not in FAST, reason="numba is not available")
def test_numba_leaves_torch_thread_count_alone():
    """numba's OpenMP layer sets the process's OpenMP thread count when it starts; torch reads
    the same count, so run.threads=1 silently became every core for the rest of the first run
    in a process. A fresh process: set 1 thread, run the numba scan forward and backward."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from star_mamba.ops import selective_scan\n"
            "from tests.test_selective_scan import make_inputs\n"
            "x = {k: v.requires_grad_() if v is not None else v for k, v in make_inputs(torch.float32).items()}\n"
            "selective_scan(**x, backend='numba').sum().backward()\n"
            "print(torch.get_num_threads())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1"], done.stdout
