"""timm integration: registry names and the model surface timm users rely on."""
import pytest
import timm
import torch

import star_mamba  # noqa: F401  (registers the models)
from star_mamba.models.timm_registry import TIMM_NAMES


def test_registry_lists_every_size():
    assert set(TIMM_NAMES) == {f"{n}_patch16_224" for n in star_mamba.list_models()}
    assert set(TIMM_NAMES) <= set(timm.list_models("star_*"))


def test_timm_create_model_and_surface():
    m = timm.create_model("star_tiny_patch16_224", img_size=32, num_classes=7, depth=2,
                          drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 7)
    feats = m.forward_features(x)
    assert feats.shape == (2, 4 + 1, 192)  # 2x2 patches + class token at the end
    assert m.forward_head(feats, pre_logits=True).shape == (2, 192)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    assert "backbone.pos_embed" in m.no_weight_decay()
    assert set(m.group_matcher()) == {"stem", "blocks"}
    m.set_grad_checkpointing(True)
    m.train()
    m(x).sum().backward()  # checkpointed blocks still give gradients
    assert m.backbone.blocks[0].mixer.in_proj.weight.grad is not None
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("star_base_patch16_224", pretrained=True)


def _tiny(class_token="end", directions=2, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("star_tiny_patch16_224", img_size=48, num_classes=5, depth=3,
                             class_token=class_token, directions=directions).eval()


@pytest.mark.parametrize("class_token", ["none", "middle", "end"])
def test_forward_intermediates_are_the_block_outputs_on_the_patch_grid(class_token):
    m = _tiny(class_token)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        final, taps = m.forward_intermediates(x, indices=[0, 2], return_prefix_tokens=True)
        orders = list(m.orders)
        ref_final, ref_taps = m.backbone.forward_blocks(m._insert_cls(m.backbone.embed(x)),
                                                        orders, taps=[1, 3])
    torch.testing.assert_close(final, m.forward_features(x))
    torch.testing.assert_close(final, ref_final)
    keep = [i for i in range(ref_taps[0].shape[1]) if i != m.cls_index]
    for (spatial, prefix), ref in zip(taps, ref_taps):
        assert spatial.shape == (2, 192, 3, 3)
        for r in range(3):
            for c in range(3):  # raster position (r, c) is patch token r*3+c (class token skipped)
                torch.testing.assert_close(spatial[:, :, r, c], ref[:, keep[r * 3 + c]])
        if class_token == "none":
            assert prefix is None
        else:
            torch.testing.assert_close(prefix[:, 0], ref[:, m.cls_index])


def test_forward_intermediates_options():
    m = _tiny("middle")
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NLC")
        picked = m.forward_intermediates(x, indices=[1, 2], intermediates_only=True,
                                         output_fmt="NLC", stop_early=True)
        normed = m.forward_intermediates(x, indices=[2], norm=True, intermediates_only=True,
                                         output_fmt="NLC")
        _, raw = m.backbone.forward_blocks(m._insert_cls(m.backbone.embed(x)), list(m.orders),
                                           taps=[3])
    assert [t.shape for t in last2] == [(1, 9, 192)] * 2
    for a, b in zip(last2, picked):
        torch.testing.assert_close(a, b)
    patches = torch.cat([raw[0][:, :m.cls_index], raw[0][:, m.cls_index + 1:]], dim=1)
    torch.testing.assert_close(normed[0], m.backbone.norm(patches))
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_timm_features_only_returns_the_pruned_taps():
    full = _tiny("none", seed=3)
    torch.manual_seed(3)
    feats = timm.create_model("star_tiny_patch16_224", img_size=48, num_classes=5, depth=3,
                              class_token="none", directions=2, features_only=True,
                              out_indices=(0, 1)).eval()
    assert len(feats.model.backbone.blocks) == 2  # blocks after the last tap are pruned
    assert feats.feature_info.channels() == [192, 192]
    assert feats.feature_info.reduction() == [16, 16]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = feats(x)
        ref = full.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert [o.shape for o in out] == [(2, 192, 3, 3)] * 2
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_pretrained_cfg_describes_the_data_and_the_model(name):
    """Built through timm's builder: the registry's cfg, on the model and on its feature getter,
    names the real stem and head and gives the fine-tuning recipe's 224 px / 0.875 / ImageNet."""
    assert timm.get_pretrained_cfg(name).to_dict()["input_size"] == (3, 224, 224)
    with torch.device("meta"):
        m = timm.create_model(name, depth=2)
        feats = timm.create_model(name, depth=2, features_only=True, out_indices=(0, 1))
    cfg = m.pretrained_cfg
    assert cfg["architecture"] == name and cfg["num_classes"] == 1000 == m.num_classes
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    stem, head = m.get_submodule(cfg["first_conv"]), m.get_submodule(cfg["classifier"])
    assert isinstance(stem, torch.nn.Conv2d) and stem.in_channels == 3 and stem.stride == (16, 16)
    assert head is m.get_classifier() and head.out_features == 1000
    data = timm.data.resolve_data_config({}, model=m)
    assert (data["input_size"], data["crop_pct"], data["mean"]) == ((3, 224, 224), 0.875, cfg["mean"])
    assert feats.pretrained_cfg["input_size"] == (3, 224, 224) and feats.feature_info.channels() == [
        m.num_features] * 2


def test_the_package_imports_only_public_timm_modules():
    import ast
    from .conftest import ROOT
    found = {}
    for path in (ROOT / "src" / "star_mamba").rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        found[path.relative_to(ROOT / "src").as_posix()] = [m for m in modules if m.split(".")[0] == "timm"]
    assert found["star_mamba/models/timm_registry.py"] and found["star_mamba/models/classifier.py"]
    private = {f: [m for m in ms if any(p.startswith("_") for p in m.split("."))]
               for f, ms in found.items()}
    assert not {f: ms for f, ms in private.items() if ms}


@pytest.mark.parametrize("indices, take", [(None, [0, 1, 2, 3]), (2, [2, 3]), ([0, -1], [0, 3]),
                                           ([1], [1])])
def test_tap_indices_follow_timm(indices, take):
    from timm.models._features import feature_take_indices  # the reference, in the test only
    from star_mamba.models.classifier import take_indices
    assert take_indices(4, indices) == (take, max(take)) == tuple(feature_take_indices(4, indices))
    for bad in (5, 0, [4], [-5]):
        with pytest.raises(ValueError, match="out of range"):
            take_indices(4, bad)


# ---------------------------------------------------------------- what timm's model tests check

SMALL = dict(img_size=32, depth=2)  # star_tiny's width (192) and 4 directions, 2 x 2 patches


def _timm_tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("star_tiny_patch16_224", **{**SMALL, **kwargs})


def test_forward_and_backward_of_the_whole_star_tiny_every_parameter_gets_a_gradient():
    """timm's test_model_forward / test_model_backward (num_classes=42): star_tiny in full (its
    12 blocks), at 64 px (the cfg's 224 px is the same model on a larger grid)."""
    m = timm.create_model("star_tiny_patch16_224", num_classes=42, img_size=64).train()
    out = m(torch.randn(2, *m.pretrained_cfg["input_size"][:1], 64, 64))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None]


def test_the_default_model_declares_a_fixed_input_size_and_takes_timm_s_tuple():
    """Without dynamic_img_size the input size is the config's (as timm's ViT, fixed_input_size);
    timm's builder then passes img_size as the (h, w) of input_size."""
    with torch.device("meta"):
        m = timm.create_model("star_tiny_patch16_224", depth=1)
    assert m.pretrained_cfg["fixed_input_size"] is True
    assert m.cfg.img_size == 224 and m.backbone.grid == (14, 14)
    small = _timm_tiny()
    with pytest.raises(AssertionError, match="Input height"):
        small(torch.randn(1, 3, 48, 48))


def test_img_size_may_be_a_square_h_w_pair():
    from star_mamba import StarConfig
    from star_mamba.errors import ConfigError
    assert StarConfig(img_size=(64, 64)).img_size == 64
    assert StarConfig.from_dict(dict(img_size=[32, 32])).replace(img_size=(48, 48)).img_size == 48
    with pytest.raises(ConfigError, match=r"^invalid config: model.img_size=\(64, 32\); only square "
                                          r"images: give one size or an \(h, w\) pair with h == w$"):
        StarConfig(img_size=(64, 32))
    with pytest.raises(ConfigError, match="only the classifier takes other sizes"):
        StarConfig(dynamic_img_size=True).validate_pretraining()


@pytest.mark.parametrize("class_token", ["none", "middle", "end"])
def test_dynamic_img_size_runs_other_sizes_with_positions_interpolated_from_the_table(class_token):
    """timm's test_model_backward at another size: dynamic_img_size=True (as timm's ViT) takes any
    multiple of the patch, rectangular too; at the model's own size it is the fixed model."""
    from star_mamba.models.pos_embed import interpolate_pos_embed
    from star_mamba.sequence import direction_orders
    fixed = _timm_tiny(class_token=class_token, num_classes=42).eval()
    m = _timm_tiny(class_token=class_token, num_classes=42, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), fixed(x))
    x = torch.randn(2, 3, 48, 64)  # a 3 x 4 grid
    table = interpolate_pos_embed(m.backbone.pos_embed, (2, 2), (3, 4))
    with torch.no_grad():
        tokens = m.backbone.patch_embed(x) + table
        n = 12
        cls_at = {"none": None, "middle": n // 2, "end": n}[class_token]
        if cls_at is not None:
            cls = m.cls_token.expand(2, -1, -1)
            tokens = torch.cat([tokens[:, :cls_at], cls, tokens[:, cls_at:]], dim=1)
        orders = direction_orders((3, 4), 4, cls_at)
        ref, _ = m.backbone.forward_blocks(tokens, orders)
        torch.testing.assert_close(m.forward_features(x), ref)
        taps = m.forward_intermediates(x, indices=1, intermediates_only=True)
    assert taps[0].shape == (2, 192, 3, 4)
    m.train()
    out = m(x)
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None]
    assert m.backbone.pos_embed.grad.abs().sum() > 0  # the table learns through the interpolation


def test_no_pooling_and_no_head_as_timm_allows():
    """reset_classifier(0, '') and global_pool='': forward returns the unpooled tokens, as
    forward_features; head_hidden_size is the width forward_head gives with pre_logits."""
    m = _timm_tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 4 + 1, m.num_features)  # forward_features: always unpooled
        assert m.forward_head(feats, pre_logits=True).shape == (2, m.head_hidden_size)
        m.reset_classifier(0)
        assert m.num_classes == 0 and m(x).shape == (2, m.num_features)
        m.reset_classifier(0, "")
        torch.testing.assert_close(m(x), feats)
        m.reset_classifier(3, "")
        assert m(x).shape == (2, 5, 3)  # the head on every token, as timm's ViT
        assert m.cfg.global_pool == ""
        bare = _timm_tiny(num_classes=0, global_pool="").eval()
        bare.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("head.")})
        torch.testing.assert_close(bare(x), feats)


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_default_cfg_matches_the_model(name):
    """timm's test_model_default_cfgs_non_std: the cfg's classes, input size, statistics, stem and
    head are the model's (state_dict names), and forward_features / a headless forward have
    its widths (run at 32 px with one block: the cfg's 224 px model is the same but for its grid)."""
    with torch.device("meta"):
        m = timm.create_model(name, depth=1)
    cfg, state = m.pretrained_cfg, m.state_dict()
    assert cfg["num_classes"] == m.num_classes == m.cfg.num_classes
    assert cfg["input_size"] == (m.cfg.in_chans, m.cfg.img_size, m.cfg.img_size)
    assert len(cfg["mean"]) == len(cfg["std"]) == m.cfg.in_chans
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert state[f"{cfg['first_conv']}.weight"].shape[1] == cfg["input_size"][0]
    assert m.head_hidden_size == m.num_features == m.cfg.embed_dim
    small = timm.create_model(name, img_size=32, depth=1).eval()
    x = torch.randn(1, cfg["input_size"][0], 32, 32)
    with torch.no_grad():
        assert small.forward_features(x).shape == (1, 4 + 1, m.num_features)
        small.reset_classifier(0)
        assert small(x).shape == (1, m.num_features)


def test_features_only_default_taps_the_last_four_blocks():
    """timm's test_model_forward_features: at least 4 levels by default, channels as declared."""
    feats = timm.create_model("star_tiny_patch16_224", img_size=32, features_only=True).eval()
    assert len(feats.feature_info.channels()) == 4
    with torch.no_grad():
        out = feats(torch.randn(1, 3, 32, 32))
    assert [o.shape for o in out] == [(1, c, 2, 2) for c in feats.feature_info.channels()]
    assert not any(torch.isnan(o).any() for o in out)


class _LeafTracer(torch.fx.Tracer):
    """torch.fx with timm's registered leaves (register_notrace_module) kept whole."""

    def is_leaf_module(self, m, qualname):
        from timm.layers import is_notrace_module
        return is_notrace_module(type(m)) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("class_token,directions", [("end", 4), ("middle", 2), ("none", 1)])
def test_fx_symbolic_trace_equals_eager(class_token, directions):
    """timm's test_model_forward_fx: the mixer is a registered leaf, the rest traces; the traced
    module computes what the model does."""
    m = _timm_tiny(class_token=class_token, directions=directions).eval()
    graph = torch.fx.GraphModule(m, _LeafTracer().trace(m))
    assert "backbone.blocks.0.mixer" in {n.target for n in graph.graph.nodes if n.op == "call_module"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), m(x))


def test_timm_fx_feature_extractor_gives_the_block_outputs():
    """features_only with feature_cls='fx' (timm's FeatureGraphNet over feature_info): the raw
    block outputs, class token included."""
    m = _timm_tiny().eval()
    torch.manual_seed(0)  # the same weights
    fx = timm.create_model("star_tiny_patch16_224", **SMALL, features_only=True, feature_cls="fx",
                           out_indices=(0, 1)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = fx(x)
        _, ref = m.backbone.forward_blocks(m._insert_cls(m.backbone.embed(x)), m.orders, taps=[1, 2])
    assert len(out) == 2
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
