"""Fine-tuning: checkpoint conversion, class token, layer decay, mixup/cutmix, and that it
actually learns."""
import json

import pytest
import torch
from timm.optim import create_optimizer_v2

import star_mamba
from star_mamba.cli import main
from star_mamba.tasks import finetune as finetune_module
from star_mamba.tasks.finetune import evaluate_checkpoint, finetune
from star_mamba.checkpoint import load_checkpoint
from star_mamba.models.classifier import StarClassifier
from star_mamba.models.convert import interpolate_pos_embed, load_pretrained
from star_mamba.models.pos_embed import sincos_2d
from star_mamba.seeding import seed_everything
from star_mamba.sequence import direction_orders, inverse_order

from .conftest import (MICRO_DECODER, TINY, finetune_config, make_noise_images, make_shapes,
                       tiny_classifier)


def _grid_indices(h: int, w: int) -> torch.Tensor:
    """A (1, h*w, 2) position table holding each patch's (row, column)."""
    rows, cols = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    return torch.stack([rows, cols], -1).reshape(1, h * w, 2)


def test_pos_interpolation_identity_geometry_and_close_to_sincos():
    table = sincos_2d(64, (12, 12)).unsqueeze(0)
    assert torch.equal(interpolate_pos_embed(table, (12, 12), (12, 12)), table)
    resized = interpolate_pos_embed(table, (12, 12), (14, 14))
    assert resized.shape == (1, 196, 64)
    target = sincos_2d(64, (14, 14)).unsqueeze(0)
    err = (resized - target).abs().mean().item()
    assert err < 0.15, err  # same geometry, slightly rescaled positions
    assert (resized - torch.randn_like(target)).abs().mean() > 5 * err  # far from unrelated
    # Known values. 12 -> 14 (align_corners=False): new index i samples old coordinate
    # (i + 0.5) * 12 / 14 - 0.5, which is 2.5 for i = 3 and 8.5 for i = 10, midway between two
    # old patches, where a symmetric kernel gives a linear ramp's midpoint exactly.
    grid = interpolate_pos_embed(_grid_indices(12, 12), (12, 12), (14, 14)).reshape(14, 14, 2)
    for i, value in ((3, 2.5), (10, 8.5)):
        torch.testing.assert_close(grid[i, :, 0], torch.full((14,), value))  # rows: row index
        torch.testing.assert_close(grid[:, i, 1], torch.full((14,), value))  # columns: column
    # 4 x 6 -> 4 x 9: only the width is resampled, so every row keeps its row index exactly
    wide = interpolate_pos_embed(_grid_indices(4, 6), (4, 6), (4, 9)).reshape(4, 9, 2)
    torch.testing.assert_close(wide[..., 0], torch.arange(4.0)[:, None].expand(4, 9))
    assert torch.all(wide[:, 1:, 1] > wide[:, :-1, 1])  # columns still increase left to right


@pytest.mark.parametrize("directions", [2, 4])
def test_widened_mixer_is_the_average_of_the_pretrained_mixer_over_scan_orders(directions):
    torch.manual_seed(0)
    pre = star_mamba.create_pretrain_model("star_tiny", **TINY, **MICRO_DECODER)
    clf = tiny_classifier(directions=directions, class_token="none")
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
    model = tiny_classifier(directions=1, class_token=position).eval()
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
    model = tiny_classifier(depth=3)
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


def test_finetuning_learns_a_tiny_problem_and_eval_agrees(tmp_path):
    make_shapes(tmp_path / "shapes")
    cfg = finetune_config(  # no augmentation, mixup or layer decay; 12 epochs
        tmp_path / "shapes", tmp_path / "out", "model.drop_path_rate=0.1", "data.num_workers=0",
        "data.max_eval_images=null", "data.auto_augment=null", "data.reprob=0",
        "data.scale=[0.9, 1.0]", "data.crop_pct=1.0", "optim.batch_size=16", "optim.lr=3e-3",
        "optim.epochs=12", "optim.warmup_epochs=1", "optim.mixup=0", "optim.cutmix=0",
        "optim.layer_decay=null", "run.ema_decay=0.9", "run.log_every=10", "run.eval_every=4")
    summary = finetune(cfg)
    assert summary["best"]["score"] >= 60.0, summary  # chance is 25%
    assert (tmp_path / "out" / "checkpoint-best.pth").is_file()
    rows = [json.loads(x) for x in open(tmp_path / "out" / "metrics.jsonl") if "top1" in x]
    assert [r["epoch"] for r in rows] == [4, 8, 12]
    result = evaluate_checkpoint(tmp_path / "out" / "checkpoint-latest.pth", cfg)
    assert result["top1"] == pytest.approx(rows[-1]["top1"])
    ema = evaluate_checkpoint(tmp_path / "out" / "checkpoint-latest.pth", cfg, use_ema=True)
    assert ema["top1"] == pytest.approx(rows[-1]["ema_top1"])


def test_head_only_finetuning_trains_the_head_and_leaves_the_backbone_as_loaded(shapes_8,
                                                                                tmp_path):
    """run.linprobe (``finetune --set run.linprobe=true``): SGD on the head through the frozen
    backbone, no EMA; the backbone ends bit-identical to the loaded checkpoint."""
    torch.manual_seed(0)
    pre = star_mamba.create_pretrain_model("star_tiny", img_size=32, patch_size=8, in_chans=3,
                                           embed_dim=32, depth=2, **MICRO_DECODER)
    torch.save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, tmp_path / "p.pth")
    cfg = finetune_config(shapes_8, tmp_path / "out", "run.linprobe=true", "optim.mixup=0",
                          "optim.cutmix=0", "optim.batch_size=8",
                          f"run.pretrained={tmp_path / 'p.pth'}")
    finetune(cfg)
    seed_everything(cfg.run.seed)  # the start finetune() made
    start = StarClassifier(finetune_module.classifier_config(cfg, 4))
    load_pretrained(start, tmp_path / "p.pth")
    saved = load_checkpoint(tmp_path / "out" / "checkpoint-latest.pth")
    assert "ema" not in saved.get("extras", {})
    for key, value in start.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(saved["model"][key], value), key
    assert not torch.equal(saved["model"]["head.weight"], start.head.weight)


def test_eval_refuses_a_pretraining_checkpoint(tmp_path, capsys):
    pre = star_mamba.create_pretrain_model("star_tiny", **TINY, **MICRO_DECODER)
    torch.save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, tmp_path / "p.pth")
    assert main(["eval", "--checkpoint", str(tmp_path / "p.pth")]) == 2
    assert "not a classifier checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_mix_images_and_soft_targets_as_timm_defines(tmp_path, monkeypatch, kind):
    """What the loss sees, checked against timm's definitions written out here: mixup is
    lam * x + (1 - lam) * x.flip(0); cutmix pastes one box of x.flip(0) and lam is the share
    left unpasted; targets are lam * smooth(y) + (1 - lam) * smooth(y.flip(0)) with
    smooth(y) = smoothing / classes + (1 - smoothing) * one_hot(y): soft, summing to 1."""
    seen = []

    class RecordingMixup(finetune_module.Mixup):
        def __call__(self, x, target):
            before, labels = x.clone(), target.clone()  # timm mixes in place
            mixed, soft = super().__call__(x, target)
            seen.append((before, labels, mixed.clone(), soft.clone()))
            return mixed, soft

    monkeypatch.setattr(finetune_module, "Mixup", RecordingMixup)
    make_noise_images(tmp_path / "noise")  # 16 images, 4 classes: 2 steps of 8
    finetune(finetune_config(
        tmp_path / "noise", tmp_path / "out", "data.num_workers=0", "optim.batch_size=8",
        "optim.smoothing=0.1", "optim.mixup_prob=1.0",
        "optim.mixup=0.8" if kind == "mixup" else "optim.mixup=0",
        "optim.cutmix=1.0" if kind == "cutmix" else "optim.cutmix=0"))
    assert len(seen) == 2
    for x, y, mixed, soft in seen:
        other = x.flip(0)
        if kind == "mixup":  # lam by least squares from the images themselves
            d = x - other
            lam = ((mixed - other) * d).sum().item() / (d * d).sum().item()
            torch.testing.assert_close(mixed, lam * x + (1 - lam) * other, rtol=1e-5, atol=1e-5)
        else:
            pasted = (mixed != x).any(0).any(0)  # (H, W): where any image changed
            rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
            box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
            assert pasted[box].all() and pasted.sum() == pasted[box].numel()  # one rectangle
            assert torch.equal(mixed[..., box[0], box[1]], other[..., box[0], box[1]])
            lam = 1 - pasted.sum().item() / pasted.numel()
        assert 0.0 < lam < 1.0, lam  # really mixed
        smooth = lambda labels: 0.1 / 4 + 0.9 * torch.nn.functional.one_hot(labels, 4).float()
        assert soft.shape == (8, 4) and (soft > 0).all()
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        torch.testing.assert_close(soft, lam * smooth(y) + (1 - lam) * smooth(y.flip(0)),
                                   rtol=1e-5, atol=1e-5)
