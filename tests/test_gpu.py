"""CUDA checks, for a machine with a GPU: ``pytest -m gpu tests/test_gpu.py -q``.

Every test here is marked ``gpu`` and skipped without CUDA; ``star-mamba bench --gpu`` runs this
file as its section 2. What they check:

* every scan backend on the device (torch, triton, and cuda where mamba-ssm imports) against
  the reference loop, in float32 and bf16: y, the last state and every gradient;
* a pretraining step and a classifier step of a small model in bf16 autocast: finite
  gradients, loss within a few percent of float32;
* ``torch.compile(fullgraph=True)`` forward+backward equal to eager.

A kernel that fails at run time silently falls back to the torch kernel (with a warning); the
tests fail in that case, so a broken Triton kernel cannot pass as the torch one.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import star_mamba
from star_mamba.ops import available_backends
from star_mamba.ops.testing import error_stats, fallbacks, scan_inputs, scan_with_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
SCAN_BACKENDS = ("torch", "triton", "cuda")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |err| / max |reference|
SMALL = dict(img_size=32, patch_size=8, in_chans=3, cluster_size=2, embed_dim=64, depth=2,
             decoder_dim=64, decoder_depth=2, decoder_heads=2)


def require(backend: str) -> None:
    if backend == "cuda" and backend not in available_backends(DEV):
        pytest.skip("mamba-ssm (backend 'cuda') is not installed with its CUDA extension")
    assert backend in available_backends(DEV), f"backend {backend!r} unavailable on CUDA"
    assert backend not in fallbacks(), f"{backend} fell back to torch: {fallbacks()[backend]}"


def assert_close_normwise(got, ref, tol, name):
    assert got.shape == ref.shape, name
    e = error_stats(got, ref)
    assert e["finite"], f"{name}: non-finite values"
    err, scale = e["max_abs"], e["scale"]
    assert err <= tol * max(scale, 1e-6), f"{name}: max error {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 40, 16, 130), (1, 72, 12, 257)],
                         ids=lambda s: "x".join(map(str, s)))
def test_scan_backend_matches_reference(backend, dtype, shape):
    """(b, dim, N, L): dims and lengths not multiples of the Triton blocks (32 channels, 64
    steps); N = 12 is not a power of two."""
    require(backend)
    b, d, n, L = shape
    inputs = scan_inputs(b, d, L, n, dtype=dtype, device=DEV)
    ref = scan_with_grads("reference", inputs).tensors()
    got = scan_with_grads(backend, inputs).tensors()
    assert got["y"].dtype == dtype and got["y"].shape == inputs["u"].shape
    for name in ref:
        assert_close_normwise(got[name], ref[name], TOL[dtype], f"{backend}/{name}")
    assert backend not in fallbacks(), f"{backend} fell back to torch: {fallbacks()[backend]}"


@pytest.mark.parametrize("layout", ["time", "model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_scan_strided_inputs_match_reference(layout, dtype):
    """The Triton scan reads u, delta, z, B, C with their own strides (no copies): time-major
    views and slices of wider tensors give the reference's values and gradients. (b, dim, N, L)
    = (2, 40, 16, 130): a partial channel block, L not a multiple of the chunk."""
    require("triton")
    inputs = scan_inputs(2, 40, 130, 16, dtype=dtype, device=DEV, layout=layout)
    ref = scan_with_grads("reference", inputs).tensors()
    got = scan_with_grads("triton", inputs).tensors()
    for name in ref:
        assert_close_normwise(got[name], ref[name], TOL[dtype], f"triton/{layout}/{name}")
    assert "triton" not in fallbacks(), fallbacks()


def test_triton_backward_is_bit_reproducible_with_and_without_register_cap(monkeypatch):
    """Two backward calls give the same bits, and capping the registers (what the backward does
    when more programs than fit in one wave queue up) changes no bit either. The shape has more
    programs (40 x 32 channel blocks) than one wave on any current GPU, so selective_scan runs the
    capped kernel: checked against the reference too."""
    require("triton")
    from star_mamba.ops import scan_triton as st
    inputs = scan_inputs(40, 1024, 40, 16, dtype=torch.bfloat16, device=DEV, seed=3)
    ref = scan_with_grads("reference", inputs).tensors()
    got = scan_with_grads("triton", inputs).tensors()
    for name in ref:
        assert_close_normwise(got[name], ref[name], TOL[torch.bfloat16], f"triton/{name}")
    x = {k: v for k, v in inputs.items()}
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    extra = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    y, last, ckpt = st.forward(*args, **extra)
    dy, dlast = torch.randn_like(y), torch.randn_like(last)
    runs = []
    for full in (0, 10 ** 9, 10 ** 9):  # 0: always capped; 10**9: never
        monkeypatch.setattr(st, "BWD_FULL_REGS_PER_SM", full)
        runs.append(st.backward(*args, ckpt, dy, dlast, **extra))
    for name, capped, free, again in zip(("u", "delta", "A", "B", "C", "D", "z", "bias"), *runs):
        assert torch.equal(free, again), f"d{name} differs between two identical calls"
        assert torch.equal(capped, free), f"d{name} differs with the register cap"


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _fp32_and_bf16(model, loss_fn):
    """Loss and gradients of the same model and batch in float32 and under bf16 autocast."""
    model.zero_grad(set_to_none=True)
    loss32 = loss_fn(model)
    loss32.backward()
    g32 = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        loss16 = loss_fn(model)
    loss16.backward()
    g16 = _grads(model)
    return loss32.item(), loss16.float().item(), g32, g16


def _check_bf16(loss32, loss16, g32, g16):
    assert math.isfinite(loss32) and math.isfinite(loss16)
    assert abs(loss16 - loss32) <= 0.03 * abs(loss32), (loss32, loss16)
    assert set(g16) == set(g32) and g16
    for name, g in g16.items():
        assert torch.isfinite(g).all(), f"non-finite gradient in {name}"
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    cos = F.cosine_similarity(flat32, flat16, dim=0).item()
    assert cos > 0.95, f"bf16 gradients point elsewhere than float32 ones (cosine {cos:.3f})"


def _auto_or(backend):
    if backend != "auto":
        require(backend)
    return backend


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_pretrain_step_bf16_matches_fp32(backend):
    torch.manual_seed(0)
    model = star_mamba.create_pretrain_model("star_tiny", images_per_sequence=2,
                                             scan_backend=_auto_or(backend), **SMALL).to(DEV)
    images = torch.randn(8, 3, 32, 32, device=DEV)
    _check_bf16(*_fp32_and_bf16(model, lambda m: m(images).loss))
    assert backend not in fallbacks()


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_classifier_step_bf16_matches_fp32(backend):
    torch.manual_seed(0)
    model = star_mamba.create_model("star_tiny", num_classes=10, scan_backend=_auto_or(backend),
                                    **{k: v for k, v in SMALL.items() if not k.startswith("decoder")
                                       and k != "cluster_size"}).to(DEV)
    images = torch.randn(8, 3, 32, 32, device=DEV)
    labels = torch.arange(8, device=DEV) % 10
    _check_bf16(*_fp32_and_bf16(model, lambda m: F.cross_entropy(m(images), labels)))
    assert backend not in fallbacks()


def _compile_kernel() -> str:
    """The scan the compiled model uses: a custom-op kernel (mamba-ssm's 'cuda' is a graph
    break by design)."""
    return "triton" if "triton" in available_backends(DEV) else "torch"


@pytest.mark.parametrize("kind", ["pretrain", "classifier"])
def test_compile_fullgraph_matches_eager(kind):
    torch.manual_seed(0)
    backend = _compile_kernel()
    if kind == "pretrain":
        model = star_mamba.create_pretrain_model("star_tiny", images_per_sequence=2,
                                                 scan_backend=backend, **SMALL).to(DEV)
        loss_fn = lambda m, x: m(x).loss  # noqa: E731
    else:
        model = star_mamba.create_model(
            "star_tiny", num_classes=10, scan_backend=backend,
            **{k: v for k, v in SMALL.items() if not k.startswith("decoder")
               and k != "cluster_size"}).to(DEV)
        loss_fn = lambda m, x: m(x).float().pow(2).mean()  # noqa: E731
    images = torch.randn(8, 3, 32, 32, device=DEV)
    loss = loss_fn(model, images)
    loss.backward()
    eager = _grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss_c = loss_fn(compiled, images)
    loss_c.backward()
    got = _grads(model)
    torch._dynamo.reset()
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=1e-5)
    assert set(got) == set(eager)
    for name in eager:
        assert_close_normwise(got[name], eager[name], 1e-3, name)
    assert backend not in fallbacks()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_attention_forward_and_backward_equal_sdpa(dtype):
    from star_mamba import sequence as seq
    from star_mamba.models.blocks import flex_attention, flex_block_mask
    mask = seq.block_causal_mask(39, 16, device=DEV)  # STAR-B K=4's decoder layout, 624 tokens
    torch.manual_seed(0)
    inputs = [torch.randn(2, 4, 624, 64, device=DEV, dtype=dtype, requires_grad=True)
              for _ in range(3)]
    grad = torch.randn(2, 4, 624, 64, device=DEV, dtype=dtype)
    results = []
    for attend in (lambda q, k, v: flex_attention(q, k, v, flex_block_mask(mask)),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)):
        out = attend(*inputs)
        grads = torch.autograd.grad(out, inputs, grad)
        results.append((out.float(), [g.float() for g in grads]))
    tol = TOL[dtype] * 4
    torch.testing.assert_close(results[0][0], results[1][0], rtol=tol, atol=tol)
    for g_flex, g_sdpa in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g_flex, g_sdpa, rtol=tol, atol=tol)


def test_a_flex_pretraining_model_trains_like_sdpa():
    images = torch.randn(4, 3, 32, 32, device=DEV)
    losses, grads = [], []
    for attention in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = star_mamba.create_pretrain_model("star_tiny", **SMALL, attention=attention).to(DEV)
        assert (model.decoder_mask() is model.mask) == (attention == "sdpa")
        loss = model(images).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(model.decoder.blocks[0].attn.q.weight.grad)
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
