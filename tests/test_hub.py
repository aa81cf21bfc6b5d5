"""save_pretrained / from_pretrained (huggingface_hub's mixin), offline with a local directory."""
import json

import pytest
import torch

import star_mamba
from star_mamba.models import StarClassifier, StarPretrain


def test_classifier_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = star_mamba.create_model("star_tiny", img_size=16, patch_size=4, depth=2, embed_dim=32,
                                    num_classes=3, class_token="middle").eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "config.json").read_text())["cfg"]["class_token"] == "middle"
    loaded = StarClassifier.from_pretrained(tmp_path).eval()
    assert loaded.cfg == model.cfg
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model(x))


def test_pretrain_model_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = star_mamba.create_pretrain_model("star_tiny", img_size=16, patch_size=4, in_chans=1,
                                             cluster_size=2, depth=2, embed_dim=32, decoder_dim=16,
                                             decoder_depth=2, decoder_heads=2,
                                             separator="embedding").eval()
    model.save_pretrained(tmp_path)
    loaded = StarPretrain.from_pretrained(tmp_path).eval()
    images = torch.randn(4, 1, 16, 16)
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(images).pred, model(images).pred)


def test_reset_classifier_and_prune_keep_the_config_and_round_trip(tmp_path, monkeypatch):
    """reset_classifier / prune_intermediate_layers change cfg with the modules, so
    save_pretrained -> from_pretrained rebuilds the changed model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = star_mamba.create_model("star_tiny", img_size=16, patch_size=4, depth=3, embed_dim=32,
                                    num_classes=3, class_token="end").eval()
    x = torch.randn(2, 3, 16, 16)

    model.reset_classifier(5, global_pool="cls")
    assert (model.cfg.num_classes, model.cfg.global_pool) == (5, "cls")
    model.save_pretrained(tmp_path / "reset")
    loaded = StarClassifier.from_pretrained(tmp_path / "reset").eval()
    assert loaded.cfg == model.cfg and torch.equal(loaded(x), model(x))

    taps = model.prune_intermediate_layers([0, 1], prune_norm=True)
    assert taps == [0, 1] and len(model.backbone.blocks) == 2 and len(model.feature_info) == 2
    assert (model.cfg.depth, model.cfg.final_norm, model.cfg.num_classes) == (2, False, 0)
    model.save_pretrained(tmp_path / "pruned")
    loaded = StarClassifier.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.cfg == model.cfg and isinstance(loaded.backbone.norm, torch.nn.Identity)
    assert torch.equal(loaded(x), model(x))  # pooled features: no head
    a, b = (m.forward_intermediates(x, indices=[0, 1], intermediates_only=True) for m in (loaded, model))
    assert all(torch.equal(u, v) for u, v in zip(a, b))

    with pytest.raises(ValueError, match="model.global_pool='cls'"):
        star_mamba.create_model("star_tiny", img_size=16, patch_size=4, depth=1, embed_dim=32,
                                class_token="none").reset_classifier(2, global_pool="cls")
