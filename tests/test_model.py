"""Models: the pretraining contract, causality (no leak), recurrent step, sizes, config errors."""
import itertools

import pytest
import torch

import star_mamba
from star_mamba import sequence as seq
from star_mamba.config import SEPARATOR_POSITIONS, SEPARATORS, StarConfig
from star_mamba.models.mamba import Mamba

from .conftest import micro_pretrain as tiny_pretrain


@pytest.mark.parametrize("position", SEPARATOR_POSITIONS)
@pytest.mark.parametrize("K", [1, 2, 4])
def test_pretrain_output_contract(position, K):
    model = tiny_pretrain(images_per_sequence=K, separator_position=position)
    cfg = model.cfg
    images = torch.randn(2 * K, 1, 8, 8)
    out = model(images)
    T = cfg.num_segments
    assert out.pred.shape == out.target.shape == (2, T - 1, 4, 4)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # the target of each image cluster is that cluster's pixels, each patch normalised
    for b, k, g in itertools.product(range(2), range(K), range(cfg.clusters_per_image)):
        t = seq.cluster_segment_index(k, g, cfg.clusters_per_image, position)
        if t == 0:
            continue  # the first segment is never a target
        expected = cluster_by_hand(images[b * K + k, 0], g)
        torch.testing.assert_close(out.target[b, t - 1], expected)


def cluster_by_hand(image, g, p=2, c=2, grid=4):
    """Cluster ``g`` (clusters in raster order over the patch grid) of a 1-channel image as
    (c*c patches in raster order within the cluster, p*p pixels), each patch normalised by its
    own mean and (population) variance, with the 1e-6 of MAE's norm_pix_loss."""
    r, col = divmod(g, grid // c)
    patches = []
    for i, j in itertools.product(range(c), range(c)):
        y, x = (r * c + i) * p, (col * c + j) * p
        pixels = image[y:y + p, x:x + p].reshape(-1)
        patches.append((pixels - pixels.mean()) / (pixels.var(unbiased=False) + 1e-6).sqrt())
    return torch.stack(patches)


def test_identity_separator_is_the_raw_target_and_loss_weights():
    model = tiny_pretrain(images_per_sequence=2, norm_target=False)  # SC, identity
    images = torch.rand(4, 1, 8, 8)
    out = model(images)
    G = model.cfg.clusters_per_image
    sep_segment = G + 1  # SC: S c0..c3 | S c0..c3 -> the second image's separator
    expected = seq.separator_patches("identity", 2, 4)
    assert torch.equal(out.target[0, sep_segment - 1], expected)
    assert out.loss_weight.tolist() == [1.0] * (2 * (G + 1) - 1)
    no_sep_loss = tiny_pretrain(images_per_sequence=2, separator_loss=False)
    assert no_sep_loss(images).loss_weight[sep_segment - 1] == 0
    assert no_sep_loss(images).loss_weight.sum() == 2 * G  # every cluster target counts


def test_loss_is_mse_over_counted_segments():
    model = tiny_pretrain(images_per_sequence=2, separator_loss=False)
    out = model(torch.randn(4, 1, 8, 8))
    w = out.loss_weight.bool()
    expected = ((out.pred - out.target) ** 2)[:, w].mean()
    torch.testing.assert_close(out.loss, expected)


def perturb_segment(images, cfg, s, generator):
    """Change every pixel of packed segment s (an image cluster); returns the new images."""
    G, K, c, p = cfg.clusters_per_image, cfg.images_per_sequence, cfg.cluster_size, cfg.patch_size
    for k, g in itertools.product(range(K), range(G)):
        if seq.cluster_segment_index(k, g, G, cfg.separator_position, cfg.has_separator) == s:
            r, col = divmod(g, cfg.cluster_grid)
            out = images.clone()
            px = c * p
            block = out[k, :, r * px:(r + 1) * px, col * px:(col + 1) * px]
            out[k, :, r * px:(r + 1) * px, col * px:(col + 1) * px] = block + 1 + torch.rand(
                block.shape, generator=generator)
            return out
    return None  # a separator segment


def leak_report(model):
    """For every image segment s: (pred[:, :s] changed?, pred[:, s] changed?) when s changes."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    base_images = torch.randn(cfg.images_per_sequence, cfg.in_chans, cfg.img_size, cfg.img_size,
                              generator=gen)
    variants, segments = [], []
    for s in range(cfg.num_segments - 1):  # the last segment is never read
        v = perturb_segment(base_images, cfg, s, gen)
        if v is not None:
            variants.append(v)
            segments.append(s)
    with torch.no_grad():
        base = model(base_images).pred[0]  # (T-1, c^2, P)
        preds = model(torch.cat(variants)).pred  # one sequence per perturbed segment
    return [(not torch.equal(preds[i, :s], base[:s]), not torch.equal(preds[i, s], base[s]))
            for i, s in enumerate(segments)]


@pytest.mark.parametrize("separator", SEPARATORS)
@pytest.mark.parametrize("position", SEPARATOR_POSITIONS)
def test_no_information_from_later_segments(separator, position):
    model = tiny_pretrain(images_per_sequence=2, separator=separator, separator_position=position)
    report = leak_report(model)
    assert len(report) >= 2 * model.cfg.clusters_per_image - 1
    assert not any(leak for leak, _ in report), "a later segment changed an earlier prediction"
    assert all(seen for _, seen in report), "the prediction right after a segment ignores it"


@pytest.mark.parametrize("separator", ["identity", "zeros", "ones"])
@pytest.mark.parametrize("position", SEPARATOR_POSITIONS)
def test_token_space_separators_are_causal(separator, position):
    model = tiny_pretrain(images_per_sequence=2, separator=separator, separator_position=position,
                          separator_space="token")
    report = leak_report(model)
    assert not any(leak for leak, _ in report), "a later segment changed an earlier prediction"
    assert all(seen for _, seen in report), "the prediction right after a segment ignores it"


@pytest.mark.parametrize("separator", ["identity", "zeros", "ones"])
def test_token_space_separator_is_the_pattern_over_channels(separator):
    """separator_space='token': the encoder reads the pattern itself as (c^2, D) token vectors
    (identity: the c diagonal tokens of the cluster all ones, the others zero), not the patch
    embedding of pixel patches; the targets stay the pixel patterns."""
    model = tiny_pretrain(images_per_sequence=2, separator=separator, separator_space="token",
                          norm_target=False)
    D, c = model.cfg.embed_dim, model.cfg.cluster_size
    tokens = model.separator_tokens()
    diagonal = torch.eye(c).reshape(c * c, 1).expand(c * c, D)
    expected = {"identity": diagonal, "zeros": torch.zeros(c * c, D),
                "ones": torch.ones(c * c, D)}[separator]
    assert torch.equal(tokens, expected)
    with torch.no_grad():
        model.encoder.patch_embed.proj.weight.add_(1.0)  # the patch embedding plays no part
    assert torch.equal(model.separator_tokens(), expected)
    pixel = tiny_pretrain(images_per_sequence=2, separator=separator, norm_target=False)
    if separator != "zeros":  # pixel space: embedded (zeros embed to the zero bias, 0 at init)
        assert not torch.equal(pixel.separator_tokens(), expected)
    images = torch.rand(4, 1, 8, 8)
    G = model.cfg.clusters_per_image
    assert torch.equal(model(images).target[0, G], seq.separator_patches(separator, c, 4))
    # the encoder sees the token-space separator: segment 0 of the packed input is the pattern
    packed = model.pack(model.by_cluster(model.encoder.embed(images)), tokens)
    assert torch.equal(packed[0, 0], expected) and torch.equal(packed[1, G + 1], expected)


def test_leak_check_catches_a_non_causal_decoder_mask():
    model = tiny_pretrain(images_per_sequence=2)
    model.mask = torch.ones_like(model.mask)  # let queries see the future
    assert any(leak for leak, _ in leak_report(model))


def test_pretrain_forward_backward_all_parameters_get_gradients():
    model = tiny_pretrain(images_per_sequence=2, separator="embedding").train()
    out = model(torch.randn(4, 1, 8, 8))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_step_equals_parallel_forward():
    torch.manual_seed(0)
    mixer = Mamba(8, d_state=4, d_conv=4, scan_backend="reference").double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    parallel = mixer(x)
    state = mixer.allocate_state(2, dtype=torch.float64)
    steps = torch.stack([mixer.step(x[:, t], state) for t in range(11)], dim=1)
    torch.testing.assert_close(steps, parallel, rtol=1e-10, atol=1e-10)


def test_backbone_step_equals_forward_blocks():
    model = tiny_pretrain()
    backbone = model.encoder.double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    parallel, _ = backbone.forward_blocks(x)
    states = backbone.allocate_state(2, dtype=torch.float64)
    steps = torch.stack([backbone.step(x[:, t], states) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, parallel, rtol=1e-9, atol=1e-9)


def test_two_direction_mixer_with_equal_branches_averages_both_scans():
    torch.manual_seed(0)
    one = Mamba(8, d_state=4, directions=1, scan_backend="reference").double()
    two = Mamba(8, d_state=4, directions=2, scan_backend="reference").double()
    two.in_proj.load_state_dict(one.in_proj.state_dict())
    two.out_proj.load_state_dict(one.out_proj.state_dict())
    for branch in two.branches:
        branch.load_state_dict(one.branches[0].state_dict())
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    expected = (one(x) + one(x.flip(1)).flip(1)) / 2
    torch.testing.assert_close(two(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,millions", [("star_base", 85.0), ("star_large", 297.0),
                                           ("star_huge", 662.7)])
def test_classifier_parameter_counts(name, millions):
    with torch.device("meta"):
        model = star_mamba.create_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.01, n


def test_classifier_defaults_and_output():
    with torch.device("meta"):
        model = star_mamba.create_model("star_base")
    assert (model.cfg.directions, model.cfg.img_size, model.cfg.num_classes) == (4, 224, 1000)
    small = star_mamba.create_model("star_tiny", img_size=8, patch_size=2, embed_dim=16, depth=2,
                                    num_classes=5, class_token="middle")
    assert small(torch.randn(3, 3, 8, 8)).shape == (3, 5)
    assert small.forward_head(small.forward_features(torch.randn(1, 3, 8, 8)),
                              pre_logits=True).shape == (1, 16)


@pytest.mark.parametrize("overrides,field", [
    (dict(img_size=30), "img_size"),
    (dict(cluster_size=3), "cluster_size"),
    (dict(separator="dots"), "separator"),
    (dict(separator_position="SSC"), "separator_position"),
    (dict(directions=3), "directions"),
    (dict(directions=2), "directions"),  # pretraining must be causal
    (dict(decoder_heads=5), "decoder_heads"),
    (dict(decoder_taps=(1, 9)), "decoder_taps"),
    (dict(decoder_taps=(1,)), "decoder_taps"),
    (dict(decoder_taps=(1, 1)), "decoder_taps"),
    (dict(patch_size=0), "patch_size"),
    (dict(images_per_sequence=1, separator="none", cluster_size=4), "images_per_sequence"),
    (dict(separator="embedding", norm_target=False), "separator_loss"),
    (dict(separator_space="tokens"), "separator_space"),
    (dict(separator="none", separator_space="token"), "separator_space"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"{field}="):
        tiny_pretrain(**overrides)


def test_taps_must_reach_the_last_block():
    """Blocks after the deepest tap would get no gradient (DDP stalls on unused parameters)."""
    with pytest.raises(ValueError, match=r"deepest tap must be the last encoder block \(2\)"):
        tiny_pretrain(decoder_taps=(1, 1))
    model = tiny_pretrain(decoder_taps=(1, 2))
    model(torch.randn(8, 1, 8, 8)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_names_and_inputs():
    with pytest.raises(ValueError, match="did you mean 'cluster_size'"):
        tiny_pretrain(clustr_size=2)
    with pytest.raises(ValueError, match="did you mean 'star_base'"):
        star_mamba.create_model("star_bse")
    model = tiny_pretrain(images_per_sequence=4)
    with pytest.raises(ValueError, match="images_per_sequence=4"):
        model(torch.randn(6, 1, 8, 8))
    with pytest.raises(ValueError, match="img_size=8"):
        model(torch.randn(4, 1, 16, 16))


def test_default_taps_are_evenly_spaced():
    assert StarConfig(depth=12).taps == (6, 8, 10, 12)
    assert StarConfig(depth=24).taps == (12, 16, 20, 24)
    assert StarConfig(depth=2, decoder_depth=2).taps == (1, 2)
    assert StarConfig(depth=12, decoder_depth=1).taps == (12,)
    assert StarConfig(depth=8, decoder_depth=3).taps == (4, 6, 8)
