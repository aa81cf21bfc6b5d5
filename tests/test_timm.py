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
