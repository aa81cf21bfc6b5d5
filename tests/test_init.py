"""Weight initialisation: ARM's scheme (the default) part by part, the trunc-normal option, and
ARM's fine-tuning head init."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import star_mamba
from star_mamba.checkpoint import check_same_model
from star_mamba.config import StarConfig
from star_mamba.tasks.finetune import finetune
from star_mamba.errors import CheckpointError, ConfigError

from .conftest import TINY, TINY_DECODER, finetune_config

# wide enough that sample statistics of a weight matrix are tight (a few percent)
WIDE = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=4, cluster_size=2,
            decoder_dim=64, decoder_depth=2, decoder_heads=2, images_per_sequence=2)


def pretrain_model(init="arm", seed=0, **overrides):
    torch.manual_seed(seed)
    return star_mamba.create_pretrain_model("star_tiny", **{**WIDE, "init": init, **overrides})


def uniform_bound(w: torch.Tensor) -> float:
    """kaiming-uniform(a=sqrt(5)) = PyTorch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return 1.0 / math.sqrt(w.shape[1])


def assert_uniform(w: torch.Tensor, bound: float, name: str) -> None:
    """Drawn from U(-bound, bound): inside the bound, reaching near it, std = bound/sqrt(3)."""
    assert w.abs().max() <= bound * (1 + 1e-6), name
    assert w.abs().max() > 0.9 * bound, name
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name


def test_arm_encoder_linears_keep_pytorch_default_with_zero_biases():
    model = pretrain_model()
    depth = WIDE["depth"]
    for i, block in enumerate(model.encoder.blocks):
        mixer = block.mixer
        for name, lin in (("in_proj", mixer.in_proj), ("x_proj", mixer.branches[0].x_proj),
                          ("fc1", block.mlp.fc1_g), ("fc1_x", block.mlp.fc1_x),
                          ("fc2", block.mlp.fc2)):
            assert_uniform(lin.weight, uniform_bound(lin.weight), f"block {i} {name}")
            if lin.bias is not None:
                assert torch.count_nonzero(lin.bias) == 0, f"block {i} {name} bias"
        # GPT-2 scaled residual: out_proj is kaiming-uniform divided by sqrt(depth)
        out = mixer.out_proj.weight
        assert_uniform(out, uniform_bound(out) / math.sqrt(depth), f"block {i} out_proj")
        # dt_proj keeps Mamba's own init: softplus(bias) = dt in [dt_min, dt_max]
        dt = F.softplus(mixer.branches[0].dt_proj.bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        assert dt.max() / dt.min() > 10  # log-uniform over two decades, not a constant
        for norm in (block.norm1, block.norm2):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
            assert torch.count_nonzero(norm.bias) == 0
            assert norm.eps == 1e-5  # ARM's LayerNorm eps


def test_arm_patch_embedding_is_lecun_normal_with_zero_bias():
    proj = pretrain_model().encoder.patch_embed.proj  # (64, 3, 8, 8): fan_in 192
    fan_in = proj.weight[0].numel()
    # timm's lecun_normal_: truncated normal (at 2 std) rescaled to variance 1/fan_in
    assert proj.weight.std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.05)
    assert proj.weight.abs().max() <= 2.0 / math.sqrt(fan_in) * 1.15
    assert torch.count_nonzero(proj.bias) == 0


def test_arm_decoder_blocks_are_xavier_and_the_projections_pytorch_default():
    decoder = pretrain_model().decoder
    for i, block in enumerate(decoder.blocks):
        for name, lin in (("q", block.attn.q), ("kv", block.attn.kv), ("proj", block.attn.proj),
                          ("fc1", block.mlp.fc1), ("fc2", block.mlp.fc2)):
            fan_out, fan_in = lin.weight.shape
            assert_uniform(lin.weight, math.sqrt(6 / (fan_in + fan_out)), f"dec {i} {name}")
            assert torch.count_nonzero(lin.bias) == 0
    for name in ("enc2dec", "pred"):
        lin = getattr(decoder, name)
        assert_uniform(lin.weight, uniform_bound(lin.weight), name)
        assert torch.count_nonzero(lin.bias) == 0
    assert decoder.query_token.std().item() == pytest.approx(0.02, rel=0.3)


def test_trunc_normal_scheme_is_the_previous_default():
    model = pretrain_model("trunc_normal")
    block = model.encoder.blocks[0]
    for lin in (block.mixer.in_proj, block.mixer.out_proj, block.mlp.fc2, model.decoder.pred,
                model.decoder.blocks[0].attn.q):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert lin.weight.abs().max() < 0.02 * 6  # a normal, not a uniform of another scale
    w = model.encoder.patch_embed.proj.weight  # xavier-uniform as a Linear (64 x 192)
    assert_uniform(w, math.sqrt(6 / (w.shape[0] + w[0].numel())), "patch_embed")
    # dt_proj is Mamba's under both schemes, drawn the same way from the same seed
    arm = pretrain_model("arm")
    torch.testing.assert_close(model.encoder.blocks[2].mixer.branches[0].dt_proj.bias,
                               arm.encoder.blocks[2].mixer.branches[0].dt_proj.bias, rtol=0, atol=0)


def test_schemes_differ_and_the_classifier_follows_its_config():
    arm = star_mamba.create_model("star_tiny", **TINY, num_classes=5)
    old = star_mamba.create_model("star_tiny", **TINY, num_classes=5, init="trunc_normal")
    w_arm = arm.backbone.blocks[0].mixer.in_proj.weight
    w_old = old.backbone.blocks[0].mixer.in_proj.weight
    assert_uniform(w_arm, uniform_bound(w_arm), "classifier in_proj (arm)")
    assert w_old.std().item() == pytest.approx(0.02, rel=0.15)
    for m in (arm, old):  # the head: trunc-normal 0.02, zero bias, under both
        assert m.head.weight.std().item() == pytest.approx(0.02, rel=0.25)
        assert torch.count_nonzero(m.head.bias) == 0


def test_init_is_validated_and_does_not_make_another_model():
    with pytest.raises(ConfigError, match=r"model.init='xavier'.*'arm', 'trunc_normal'"):
        StarConfig(init="xavier")
    saved = StarConfig(**TINY, **TINY_DECODER, init="trunc_normal")
    current = StarConfig(**TINY, **TINY_DECODER)
    check_same_model(saved.to_dict(), current.to_dict(), "run")  # resumes under 'arm'
    with pytest.raises(CheckpointError, match="model.norm_eps: checkpoint 1e-06 vs config 1e-05"):
        check_same_model(StarConfig(**TINY, **TINY_DECODER, norm_eps=1e-6).to_dict(),
                         current.to_dict(), "run")


@pytest.mark.parametrize("std,expected", [(None, 0.02), (2e-5, 2e-5)])
def test_finetuning_from_a_checkpoint_redraws_the_head(tmp_path, shapes_8, std, expected):
    """ARM re-draws the head with std 2e-5 after loading pretrained weights (the default);
    run.head_init_std=null keeps the model's 0.02. The first step's lr is 0 (warm-up), so the
    saved head is the initial one."""
    torch.manual_seed(0)
    geometry = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2)
    pre = star_mamba.create_pretrain_model("star_tiny", **geometry, cluster_size=2,
                                           decoder_dim=32, decoder_depth=2, decoder_heads=2,
                                           images_per_sequence=2)
    ckpt = tmp_path / "pre.pth"
    torch.save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, ckpt)
    cfg = finetune_config(shapes_8, tmp_path / "ft", f"run.pretrained={ckpt}",
                          f"run.head_init_std={'null' if std is None else std}",
                          "optim.batch_size=8", "optim.warmup_epochs=1", "run.max_steps=1",
                          "run.ema_decay=null",
                          "optim.mixup=0", "optim.cutmix=0")
    finetune(cfg)
    state = torch.load(tmp_path / "ft" / "checkpoint-latest.pth", weights_only=False)["model"]
    head = state["head.weight"]  # (4, 32)
    assert head.std().item() == pytest.approx(expected, rel=0.3)
    # the backbone came from the checkpoint, untouched by the head init
    torch.testing.assert_close(state["backbone.patch_embed.proj.weight"],
                               pre.state_dict()["encoder.patch_embed.proj.weight"])


def test_head_init_std_must_be_positive(tmp_path, shapes_8):
    with pytest.raises(ValueError, match="run.head_init_std=0"):  # refused with the config
        finetune(finetune_config(shapes_8, tmp_path / "ft", "run.head_init_std=0"))
