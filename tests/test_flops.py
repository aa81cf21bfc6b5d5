"""The FLOP count MFU is computed from (tools/flops.py) against analytic counts."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from star_mamba.models.pretrain import StarPretrain
from star_mamba.models.registry import model_config
from star_mamba.tools.flops import counter, masked_score_fraction, step_flops


def _conv_step(groups: int, channels: int = 48, length: int = 37, k: int = 4):
    x = torch.randn(2, channels, length, requires_grad=True)
    w = torch.randn(channels, channels // groups, k, requires_grad=True)
    return lambda: F.conv1d(x, w, padding=k - 1, groups=groups).sum().backward(), \
        2 * 2 * channels * (length + k - 1) * (channels // groups) * k  # forward FLOPs


def test_depthwise_conv_backward_is_counted_per_group():
    step, forward = _conv_step(groups=48)
    with counter() as mode:
        step()
    assert mode.get_total_flops() == 3 * forward  # forward, input and weight gradients
    with FlopCounterMode(display=False) as plain:  # torch's own count, groups ignored
        step()
    assert plain.get_total_flops() > 10 * forward


def test_dense_conv_count_is_torchs():
    step, forward = _conv_step(groups=1)
    with counter() as mode:
        step()
    with FlopCounterMode(display=False) as plain:
        step()
    assert mode.get_total_flops() == plain.get_total_flops() == 3 * forward


def test_cpu_attention_is_counted_dense():
    b, h, lq, d = 2, 3, 20, 8
    q = torch.randn(b, h, lq, d, requires_grad=True)
    mask = torch.ones(lq, lq, dtype=torch.bool).tril()
    with counter() as mode:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert mode.get_total_flops() == 2 * (2 * b * h * lq * lq * d)  # Q K^T and P V, every score
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert plain.get_total_flops() == 0  # why the formula is ours
    assert masked_score_fraction(mask) == pytest.approx(1 - (lq * (lq + 1) / 2) / lq ** 2)


def test_pretraining_step_count_includes_attention_and_an_honest_conv():
    cfg = model_config("star_tiny", embed_dim=32, depth=2, img_size=16, patch_size=4, in_chans=1,
                       cluster_size=2, images_per_sequence=2, decoder_dim=32, decoder_depth=1,
                       decoder_heads=2)
    model = StarPretrain(cfg)
    result = step_flops(model, torch.randn(4, 1, 16, 16))
    ops = result.by_op
    assert any("scaled_dot_product" in op for op in ops)  # the decoder's attention, on CPU
    # every conv backward costs at most two of its forwards (patch embedding: one, no input grad)
    assert ops["aten.convolution_backward"] <= 2 * ops["aten.convolution"]
    assert result.scan > 0 and result.total == result.counted + result.scan
    assert all(p.grad is None for p in model.parameters())
