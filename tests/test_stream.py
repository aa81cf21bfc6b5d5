"""Streaming inference: image-by-image recurrent encoding equals the packed parallel forward."""
import pytest
import torch

import star_mamba
from star_mamba import sequence as seq
from star_mamba.config import SEPARATOR_POSITIONS
from star_mamba.models.stream import StarStream

from .conftest import MICRO, micro_pretrain


def tiny_pretrain(**overrides):
    return micro_pretrain(**overrides).double()


def parallel_features(model, images):
    """Final-normed encoder features of the whole packed sequence (B, T*c^2, D)."""
    tokens = model.by_cluster(model.encoder.embed(images))
    packed = model.pack(tokens, model.separator_tokens())  # (B, T, c^2, D), all T segments
    final, _ = model.encoder.forward_blocks(packed.flatten(1, 2))
    return final


@pytest.mark.parametrize("separator,position", [("identity", p) for p in SEPARATOR_POSITIONS]
                         + [("embedding", "SC"), ("none", "SC"), ("identity-token", "SC")])
def test_stream_equals_packed_parallel_forward(separator, position):
    K, B = 3, 2
    separator, _, space = separator.partition("-")
    model = tiny_pretrain(images_per_sequence=K, separator=separator, separator_position=position,
                          separator_space=space or "pixel")
    cfg = model.cfg
    images = torch.randn(B * K, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = parallel_features(model, images)  # (B, T*c^2, D)
    stream = StarStream(model, batch_size=B)
    memory = stream.state_bytes()
    outs = [stream.push(images.view(B, K, 1, 8, 8)[:, k]) for k in range(K)]
    assert stream.state_bytes() == memory  # constant memory over the stream
    torch.testing.assert_close(torch.cat([o.tokens for o in outs], 1), ref, rtol=1e-10, atol=1e-10)
    # patches: raster patch r of image k sits at its cluster's segment in the packed sequence
    c2, G = cfg.tokens_per_segment, cfg.clusters_per_image
    where = seq.inverse_order(seq.cluster_order((4, 4), 2))  # raster -> cluster-order position
    for k, out in enumerate(outs):
        assert out.patches.shape == (B, cfg.num_patches, cfg.embed_dim)
        for r in range(cfg.num_patches):
            g, i = divmod(int(where[r]), c2)
            t = seq.cluster_segment_index(k, g, G, position, separator != "none")
            torch.testing.assert_close(out.patches[:, r], ref[:, t * c2 + i], rtol=1e-10, atol=1e-10)


def test_stream_carries_context_and_reset_forgets_it():
    model = tiny_pretrain(images_per_sequence=2)
    a, b = torch.randn(2, 1, 1, 8, 8, dtype=torch.float64)
    stream = StarStream(model)
    first = stream.push(a).tokens
    after_a = stream.push(b).tokens
    stream.reset()
    torch.testing.assert_close(stream.push(a).tokens, first)  # same start after a reset
    stream.reset()
    alone = stream.push(b).tokens
    assert not torch.allclose(alone, after_a)  # b is read in the context of a


def test_stream_errors():
    model = tiny_pretrain()
    with pytest.raises(ValueError, match="expected \\(2, 1, 8, 8\\)"):
        StarStream(model, batch_size=2).push(torch.randn(1, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="StarPretrain"):
        StarStream(star_mamba.create_model("star_tiny", **MICRO))
