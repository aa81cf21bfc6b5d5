"""save_pretrained / from_pretrained (huggingface_hub's mixin), offline with a local directory."""
import json

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
