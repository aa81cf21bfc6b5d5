"""``model.attention``: FlexAttention for the pretraining decoder. On the CPU its forward (the
eager reference; FlexAttention has no CPU backward) with the block mask built from the layout's
boolean mask equals SDPA with that mask, for layouts whose length is not a multiple of the
128-token block; a model asked for flex trains through SDPA on the CPU. The backward on CUDA is
in tests/test_gpu.py."""
import pytest
import torch
import torch.nn.functional as F

import star_mamba
from star_mamba import sequence as seq
from star_mamba.errors import ConfigError
from star_mamba.models.blocks import flex_attention, flex_block_mask

from .conftest import MICRO, MICRO_DECODER


@pytest.mark.parametrize("segments,segment_len", [(7, 4), (17, 16), (3, 100)])
def test_flex_with_the_block_mask_equals_sdpa_with_the_boolean_mask(segments, segment_len):
    mask = seq.block_causal_mask(segments, segment_len)  # (L, L), L = 28, 272, 300
    length = segments * segment_len
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 16) for _ in range(3))
    block_mask = flex_block_mask(mask)
    with torch.no_grad():
        out = flex_attention(q, k, v, block_mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=1e-5, atol=1e-5)
    # the mask is really applied: without it the outputs differ
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-3)


def test_a_flex_model_runs_sdpa_on_the_cpu_with_the_same_loss_and_gradients():
    images = torch.randn(4, 1, 8, 8)
    results = []
    for attention in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = star_mamba.create_pretrain_model("star_tiny", **MICRO, **MICRO_DECODER,
                                                 attention=attention)
        assert model.decoder_mask() is model.mask  # the boolean mask: SDPA on the CPU
        loss = model(images).loss
        loss.backward()
        results.append((loss.detach(), model.decoder.blocks[0].attn.q.weight.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_attention_kernel_is_checked():
    with pytest.raises(ConfigError, match=r"attention.*'flash'"):
        star_mamba.create_pretrain_model("star_tiny", **MICRO, **MICRO_DECODER, attention="flash")
