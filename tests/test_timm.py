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
