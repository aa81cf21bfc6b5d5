"""Fused memory-bound ops (``model.fused_ops``): the one-node SwiGLU MLP equals timm's SwiGLU
forward and backward in float32 and under bf16 autocast, keeps exactly the tensors it says for
the backward (fewer bytes than timm's), and a model built with it is the same model."""
import pytest
import torch
from timm.layers import SwiGLU
from torch import nn

import star_mamba
from star_mamba.models.blocks import SwiGLUMlp
from star_mamba.ops.swiglu import swiglu_mlp

from .conftest import MICRO, MICRO_DECODER, assert_same_tensors

D, H, TOKENS = 24, 64, (2, 10)


def _pair(seed: int = 0):
    """timm's SwiGLU and ours with the same (non-trivial) weights."""
    torch.manual_seed(seed)
    ref = SwiGLU(D, H, act_layer=nn.SiLU)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.3)
    ours = SwiGLUMlp(D, H, fused=True)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _forward_backward(module, x, grad, autocast: bool = False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    out.backward(grad)
    return out, x.grad, {n: p.grad for n, p in module.named_parameters()}


def test_fused_swiglu_equals_timms_in_float32():
    ref, ours = _pair()
    x, grad = torch.randn(*TOKENS, D), torch.randn(*TOKENS, D)
    out_r, gx_r, gp_r = _forward_backward(ref, x, grad)
    out_o, gx_o, gp_o = _forward_backward(ours, x, grad)
    torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_o, gx_r, rtol=1e-5, atol=1e-5)
    assert_same_tensors(gp_o, gp_r, "grad", rtol=1e-5, atol=1e-5)


def test_fused_swiglu_under_bf16_autocast_matches_timms_at_bf16_precision():
    ref, ours = _pair(1)
    x, grad = torch.randn(*TOKENS, D), torch.randn(*TOKENS, D)
    out_r, gx_r, gp_r = _forward_backward(ref, x, grad, autocast=True)
    out_o, gx_o, gp_o = _forward_backward(ours, x, grad, autocast=True)
    assert out_o.dtype == out_r.dtype == torch.bfloat16  # computed where autocast computes
    assert gx_o.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gp_o.values())
    torch.testing.assert_close(out_o.float(), out_r.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_o, gx_r, rtol=5e-2, atol=1e-1)
    assert_same_tensors(gp_o, gp_r, "grad", rtol=5e-2, atol=1e-1)
    # and both are near the float32 result: the fused path is not less precise than timm's
    _, gx_32, _ = _forward_backward(ref, x, grad)
    assert (gx_o - gx_32).abs().mean() <= 1.5 * (gx_r - gx_32).abs().mean()


def _saved_bytes(module, x, autocast: bool = False) -> int:
    """Bytes of the activations autograd keeps for ``module``'s backward, each tensor once
    (views of one, such as a linear's flattened input, counted once). An activation is what
    has one row per token; weights, their casts and biases have not (N differs from D, H, 2H)."""
    n = TOKENS[0] * TOKENS[1]
    saved = {}

    def pack(t):
        if t.shape[:-1].numel() == n:
            saved[(t.data_ptr(), t.dtype, t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            module(x.requires_grad_(True))
    return sum(saved.values())


@pytest.mark.parametrize("autocast,elem", [(False, 4), (True, 2)])
def test_fused_swiglu_saves_the_input_and_the_projection_only(autocast, elem):
    ref, ours = _pair()
    x = torch.randn(*TOKENS, D)
    n = TOKENS[0] * TOKENS[1]
    # per token: the input (in the compute dtype) and h = [gate, value]
    assert _saved_bytes(ours, x.clone(), autocast) == n * (D + 2 * H) * elem
    # timm's: the input, gate, SiLU, value and product
    assert _saved_bytes(ref, x.clone(), autocast) == n * (D + 4 * H) * elem


def test_swiglu_mlp_without_biases():
    torch.manual_seed(0)
    wg, wv, wo = torch.randn(H, D), torch.randn(H, D), torch.randn(D, H)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    args = (wg.double().requires_grad_(), None, wv.double().requires_grad_(), None,
            wo.double().requires_grad_(), None)
    assert torch.autograd.gradcheck(lambda x, a, b, c: swiglu_mlp(x, a, None, b, None, c, None),
                                    (x, args[0], args[2], args[4]))


def test_a_model_with_fused_ops_is_the_same_model():
    torch.manual_seed(0)
    plain = star_mamba.create_pretrain_model("star_tiny", **MICRO, **MICRO_DECODER)
    fused = star_mamba.create_pretrain_model("star_tiny", **MICRO, **MICRO_DECODER, fused_ops=True)
    fused.load_state_dict(plain.state_dict())  # the same keys: checkpoints load either way
    images = torch.randn(4, 1, 8, 8)
    losses = []
    for model in (plain, fused):
        model.zero_grad()
        loss = model(images).loss
        loss.backward()
        losses.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-6)
    assert_same_tensors(losses[1][1], losses[0][1], "grad", rtol=1e-4, atol=1e-6)
