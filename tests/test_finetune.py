"""Fine-tuning: checkpoint conversion, class token, layer decay, and that it actually learns."""
import json

import pytest
import torch
from PIL import Image, ImageDraw
from timm.optim import create_optimizer_v2

import star_mamba
from star_mamba.cli import main
from star_mamba.engine.config import load_config
from star_mamba.engine.finetune import evaluate_checkpoint, finetune
from star_mamba.models.convert import interpolate_pos_embed, load_pretrained
from star_mamba.models.pos_embed import sincos_2d
from star_mamba.sequence import direction_orders, inverse_order

TINY = dict(patch_size=4, in_chans=1, embed_dim=32, depth=2)


def test_pos_interpolation_identity_and_close_to_sincos():
    table = sincos_2d(64, (12, 12)).unsqueeze(0)
    assert torch.equal(interpolate_pos_embed(table, (12, 12), (12, 12)), table)
    resized = interpolate_pos_embed(table, (12, 12), (14, 14))
    assert resized.shape == (1, 196, 64)
    target = sincos_2d(64, (14, 14)).unsqueeze(0)
    rescaled_positions = sincos_2d(64, (14, 14)).unsqueeze(0)
    err = (resized - target).abs().mean().item()
    assert err < 0.15, err  # same geometry, slightly rescaled positions
    assert (resized - torch.randn_like(target)).abs().mean() > 5 * err  # far from unrelated
    assert rescaled_positions.shape == resized.shape


@pytest.mark.parametrize("directions", [2, 4])
def test_widened_mixer_is_the_average_of_the_pretrained_mixer_over_scan_orders(directions):
    torch.manual_seed(0)
    pre = star_mamba.create_pretrain_model("star_tiny", img_size=16, cluster_size=2,
                                           decoder_dim=16, decoder_depth=2, decoder_heads=2, **TINY)
    clf = star_mamba.create_model("star_tiny", img_size=16, directions=directions,
                                  class_token="none", num_classes=3, **TINY)
    report = load_pretrained(clf, {"model": pre.state_dict(), "model_config": pre.cfg.to_dict()})
    assert "backbone.blocks.0.mixer.branches.0.A_log" in report.loaded
    assert "backbone.blocks.1.mixer.branches.1.conv1d.weight" in report.converted
    assert "backbone.pos_embed" in report.converted
    assert report.new == ["head.weight", "head.bias"]
    assert all(k.startswith("decoder.") or k == "sep_query_pos" for k in report.unused)
    one = pre.encoder.blocks[0].mixer.double()
    wide = clf.backbone.blocks[0].mixer.double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    orders = direction_orders((4, 4), directions)
    expected = sum(one(x[:, o])[:, inverse_order(o)] for o in orders) / directions
    torch.testing.assert_close(wide(x, orders), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("position", ["middle", "end"])
def test_class_token_placement_in_a_causal_scan(position):
    torch.manual_seed(0)
    model = star_mamba.create_model("star_tiny", img_size=16, directions=1, class_token=position,
                                    num_classes=3, **TINY).eval()
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model.forward_features(images)
        model.cls_token.add_(torch.randn_like(model.cls_token))  # not a constant: LN removes those
        after = model.forward_features(images)
    i = model.cls_index
    assert before.shape == (2, 17, 32) and i == {"middle": 8, "end": 16}[position]
    assert torch.equal(before[:, :i], after[:, :i])  # causal: tokens before the class token
    assert not torch.equal(before[:, i], after[:, i])
    if position == "middle":
        assert not torch.equal(before[:, i + 1:], after[:, i + 1:])


def test_layer_decay_groups_scale_lr_by_depth():
    model = star_mamba.create_model("star_tiny", img_size=16, num_classes=3, **{**TINY, "depth": 3})
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {}
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            scale[name] = (group["lr_scale"], group["weight_decay"])
    # 5 layers: stem (0), blocks 0..2 (1..3), final norm and head (4)
    assert scale["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.5 ** 4)
    assert scale["backbone.blocks.0.mlp.fc2.weight"][0] == pytest.approx(0.5 ** 3)
    assert scale["backbone.blocks.2.mlp.fc2.weight"][0] == pytest.approx(0.5)
    assert scale["head.weight"] == (pytest.approx(1.0), 0.05)
    assert scale["head.bias"][1] == 0.0 and scale["backbone.pos_embed"][1] == 0.0
    assert scale["backbone.blocks.1.mixer.branches.0.A_log"][1] == 0.0


def make_shapes(root, per_class=24, size=32):
    """A tiny learnable ImageFolder: four shape classes at random places."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for c, kind in enumerate(("disc", "square", "hbar", "vbar")):
            (root / split / kind).mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", (size, size), (20, 20, 20))
                d = ImageDraw.Draw(img)
                x, y = (torch.randint(4, size - 16, (2,), generator=gen)).tolist()
                box = {"disc": (x, y, x + 12, y + 12), "square": (x, y, x + 12, y + 12),
                       "hbar": (x, y + 4, x + 14, y + 8), "vbar": (x + 4, y, x + 8, y + 14)}[kind]
                (d.ellipse if kind == "disc" else d.rectangle)(box, fill=(230, 230, 230))
                img.save(root / split / kind / f"{i}.png")


def test_finetuning_learns_a_tiny_problem_and_eval_agrees(tmp_path):
    make_shapes(tmp_path / "shapes")
    overrides = [
        "model.name=star_tiny", "model.img_size=32", "model.patch_size=8", "model.in_chans=3",
        "model.embed_dim=32", "model.depth=2", "model.num_classes=4", "model.directions=2",
        f"data.root={tmp_path / 'shapes'}", "data.name=imagefolder", "data.eval_split=val",
        "data.num_workers=0",
        "data.auto_augment=null", "data.reprob=0", "data.scale=[0.9, 1.0]", "data.crop_pct=1.0",
        "optim.batch_size=16", "optim.lr=3e-3", "optim.epochs=12", "optim.warmup_epochs=1",
        "optim.mixup=0", "optim.cutmix=0", "optim.layer_decay=null", "run.ema_decay=0.9",
        "run.pretrained=null", "run.progress=false", "run.tensorboard=false", "run.threads=1",
        f"run.output_dir={tmp_path / 'out'}", "run.eval_every=4"]
    cfg = load_config("finetune/fashion_mnist", overrides)
    summary = finetune(cfg)
    assert summary["best"]["score"] >= 60.0, summary  # chance is 25%
    assert (tmp_path / "out" / "checkpoint-best.pth").is_file()
    rows = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl") if "top1" in x]
    assert [r["epoch"] for r in rows] == [4, 8, 12]
    result = evaluate_checkpoint(tmp_path / "out" / "checkpoint-latest.pth", cfg)
    assert result["top1"] == pytest.approx(rows[-1]["top1"])
    ema = evaluate_checkpoint(tmp_path / "out" / "checkpoint-latest.pth", cfg, use_ema=True)
    assert ema["top1"] == pytest.approx(rows[-1]["ema_top1"])


def test_eval_refuses_a_pretraining_checkpoint(tmp_path, capsys):
    pre = star_mamba.create_pretrain_model("star_tiny", img_size=16, cluster_size=2,
                                           decoder_dim=16, decoder_depth=2, decoder_heads=2, **TINY)
    torch.save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, tmp_path / "p.pth")
    assert main(["eval", "--checkpoint", str(tmp_path / "p.pth")]) == 2
    assert "not a classifier checkpoint" in capsys.readouterr().err
