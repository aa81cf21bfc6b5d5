"""star_mamba.tools.viz: the inverse helpers, the per-position loss and the figures of a checkpoint."""
import json
import math

import pytest
import torch
from PIL import Image

from star_mamba import sequence as seq
from star_mamba.tools import viz
from star_mamba.config import SEPARATOR_POSITIONS, StarConfig
from star_mamba.checkpoint import atomic_save, export_safetensors
from star_mamba.engine.config import load_config
from star_mamba.models.classifier import StarClassifier
from star_mamba.models.pretrain import StarPretrain

from .conftest import requires_fashion_mnist

TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, directions=1,
            decoder_dim=16, decoder_depth=2, decoder_heads=2)
LAYOUTS = [("identity", p) for p in SEPARATOR_POSITIONS] + [("none", "SC")]


def tiny_model(**overrides) -> StarPretrain:
    torch.manual_seed(0)
    return StarPretrain(StarConfig(**{**TINY, "cluster_size": 2, **overrides})).eval()


def save_pretrain(path, model):
    atomic_save(dict(model=model.state_dict(), model_config=model.cfg.to_dict()), path)
    return path


def test_unnormalize_inverts_normalize():
    raw = torch.randn(3, 5, 7, 12) * 4 + 2
    raw[0, 0, 0] = 0.25  # a constant patch: normalised to 0, back to its mean
    normed = seq.normalize_patches(raw)
    torch.testing.assert_close(viz.unnormalize_patches(normed, raw), raw, rtol=1e-5, atol=1e-5)
    assert torch.equal(viz.unnormalize_patches(torch.zeros(4), torch.full((4,), 0.25)),
                       torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="same shape"):
        viz.unnormalize_patches(normed, raw[:1])


@pytest.mark.parametrize("separator,position", LAYOUTS)
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("cluster_size", [1, 2])
def test_segments_to_images_reconstructs_the_images(separator, position, K, cluster_size):
    cfg = StarConfig(**TINY, cluster_size=cluster_size, images_per_sequence=K,
                     separator=separator, separator_position=position)
    cfg.validate_pretraining()
    images = torch.randn(2 * K, 1, 8, 8)
    target = StarPretrain(cfg).target_pixels(images)  # (B, T-1, c^2, P)
    assert target.shape == (2, cfg.num_segments - 1, cluster_size ** 2, 4)
    back = viz.segments_to_images(target, cfg)
    assert back.shape == images.shape
    missing = viz.unpredicted_clusters(cfg)  # (K, G)
    has_missing = separator == "none" or position in ("CS", "CSC")
    assert missing.sum().item() == int(has_missing) and bool(missing[0, 0]) == has_missing
    span = cluster_size * 2
    known = torch.ones_like(images, dtype=torch.bool)
    if has_missing:  # image 0 of every sequence: cluster 0 (top-left) is segment 0
        known[::K, :, :span, :span] = False
    assert torch.isnan(back[~known]).all()
    assert torch.equal(back[known], images[known])
    # one sequence at a time, and another fill value
    one = viz.segments_to_images(target[1], cfg, fill=0.5)
    assert one.shape == (K, 1, 8, 8)
    assert torch.equal(one[known[K:]], images[K:][known[K:]])
    assert (one[~known[K:]] == 0.5).all()


def _segments_by_hand(images: torch.Tensor, k: int, position: str) -> list[list[list[float]]]:
    """The packed raw segments of 8 px, 1-channel images with 2 px patches and 2 x 2 clusters,
    written out pixel by pixel: sequence b is images b*K .. b*K+K-1; a segment is 4 patches
    (raster order in the cluster) of 4 pixels (raster order in the patch); the identity
    separator is 1 on the cluster's diagonal patches."""
    def cluster(img, g):  # clusters in raster order over the 2 x 2 cluster grid
        r, c = 4 * (g // 2), 4 * (g % 2)
        return [[img[0, r + 2 * i + u, c + 2 * j + v].item() for u in (0, 1) for v in (0, 1)]
                for i in (0, 1) for j in (0, 1)]
    sep = [[1.0 if i == j else 0.0] * 4 for i in (0, 1) for j in (0, 1)]
    order = {"SC": ["S", 0, 1, 2, 3], "CSC": [0, "S", 1, "S", 2, "S", 3, "S"]}[position]
    return [[sep if s == "S" else cluster(images[b * k + n], s)
             for n in range(k) for s in order] for b in range(images.shape[0] // k)]


@pytest.mark.parametrize("position", ["SC", "CSC"])
def test_targets_are_the_packed_pixels_normalised_per_patch(position):
    """Raw targets against the sequence written out by hand, normalised by hand (biased
    variance, eps 1e-6 inside the root); unnormalize_patches maps them back to the pixels."""
    model = tiny_model(images_per_sequence=2, separator="identity", separator_position=position)
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    raw = torch.tensor(_segments_by_hand(images, 2, position))[:, 1:]  # (B, T-1, 4, 4)
    torch.testing.assert_close(model.target_pixels(images), raw, rtol=0, atol=0)
    mean = raw.mean(-1, keepdim=True)
    var = ((raw - mean) ** 2).sum(-1, keepdim=True) / raw.shape[-1]
    target = model.forward_target(images)
    torch.testing.assert_close(target, (raw - mean) / torch.sqrt(var + 1e-6))
    torch.testing.assert_close(viz.unnormalize_patches(target, raw), raw, atol=1e-5, rtol=1e-5)
    assert target.abs().sum() > 0


@pytest.mark.parametrize("separator,position", LAYOUTS)
def test_loss_per_position(separator, position):
    model = tiny_model(images_per_sequence=3, separator=separator, separator_position=position)
    cfg = model.cfg
    with torch.no_grad():
        out = model(torch.randn(6, 1, 8, 8))
    table = viz.loss_per_position(out.patch_loss, cfg)
    assert table.shape == (3, cfg.clusters_per_image)
    assert torch.equal(torch.isnan(table), viz.unpredicted_clusters(cfg))
    # entry (k, g) is the MSE of that cluster's segment
    t = seq.cluster_segment_index(2, 1, cfg.clusters_per_image, position, cfg.has_separator)
    expected = ((out.pred[:, t - 1] - out.target[:, t - 1]) ** 2).mean()
    torch.testing.assert_close(table[2, 1], expected)
    if separator == "none":  # every target is an image cluster with weight 1: the model's loss
        torch.testing.assert_close(table[~torch.isnan(table)].mean(), out.loss)
    with pytest.raises(ValueError):
        viz.loss_per_position(out.patch_loss[:, :-1], cfg)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        viz.load_pretrain_checkpoint(tmp_path / "nope.pth")
    cls_cfg = StarConfig(**{**TINY, "directions": 2}, num_classes=3)
    classifier = StarClassifier(cls_cfg)
    path = tmp_path / "classifier.pth"
    atomic_save(dict(model=classifier.state_dict(), model_config=cls_cfg.to_dict()), path)
    with pytest.raises(ValueError, match="pretraining checkpoint"):
        viz.load_pretrain_checkpoint(path)
    with pytest.raises(ValueError, match="pretraining checkpoint"):
        viz.visualize(path, tmp_path / "out")
    model = tiny_model()
    atomic_save(dict(model=model.state_dict()), tmp_path / "noconfig.pth")
    with pytest.raises(ValueError, match="model config"):
        viz.load_pretrain_checkpoint(tmp_path / "noconfig.pth")


def test_load_pretrain_checkpoint_round_trip(tmp_path):
    model = tiny_model(images_per_sequence=2)
    save_pretrain(tmp_path / "checkpoint-latest.pth", model)
    images = torch.randn(4, 1, 8, 8)
    for source in (tmp_path / "checkpoint-latest.pth", tmp_path,  # a run directory
                   export_safetensors(tmp_path / "checkpoint-latest.pth", tmp_path / "m.safetensors")):
        loaded, _ = viz.load_pretrain_checkpoint(source)
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(images).pred, model(images).pred)


def check_png(path, min_size):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.load()
        assert im.width >= min_size[0] and im.height >= min_size[1], im.size
        assert im.width < 4000 and im.height < 4000


@pytest.mark.parametrize("separator,position", [("identity", "SC"), ("none", "SC")])
def test_visualize_writes_figures(tmp_path, separator, position):
    model = tiny_model(img_size=16, patch_size=4, in_chans=3, images_per_sequence=2,
                       separator=separator, separator_position=position)
    ckpt = save_pretrain(tmp_path / "ckpt.pth", model)
    cfg = load_config("pretrain/fashion_mnist", ["data.name=synthetic", "data.synthetic_images=24",
                                                 "optim.batch_size=8"])
    out = viz.visualize(ckpt, tmp_path / "viz", cfg, num_sequences=2, max_batches=2)
    check_png(tmp_path / "viz" / "predictions.png", (200, 300))
    check_png(tmp_path / "viz" / "loss_per_position.png", (600, 250))
    saved = json.loads((tmp_path / "viz" / "loss_per_position.json").read_text())
    G = model.cfg.clusters_per_image
    assert saved["sequences"] == 8 and len(saved["loss_per_position"]) == 2
    assert all(len(row) == G for row in saved["loss_per_position"])
    table = torch.tensor([[math.nan if v is None else v for v in row]
                          for row in saved["loss_per_position"]])
    assert torch.equal(torch.isnan(table), viz.unpredicted_clusters(model.cfg))
    assert out["predictions"].endswith("predictions.png")
    assert out["loss_json"].endswith("loss_per_position.json")
    if separator == "none":
        assert math.isnan(out["first_cluster_loss_image0"]) and saved["first_cluster_loss_image0"] is None
        assert out["separator_target_loss"] is None
    else:
        assert out["first_cluster_loss_image0"] == pytest.approx(table[0, 0].item())
        assert out["separator_target_loss"] >= 0
    assert out["first_cluster_loss_later_images"] == pytest.approx(table[1, 0].item())
    # same seed, same numbers
    again = viz.visualize(ckpt, tmp_path / "viz2", cfg, num_sequences=2, max_batches=2)
    torch.testing.assert_close(torch.tensor(again["loss_per_position"]),
                               torch.tensor(out["loss_per_position"]), rtol=0, atol=0,
                               equal_nan=True)


@requires_fashion_mnist
def test_visualize_fashion_mnist(tmp_path):
    model = tiny_model(img_size=32, patch_size=8, cluster_size=2, images_per_sequence=2,
                       separator_position="CS")
    ckpt = save_pretrain(tmp_path / "ckpt.pth", model)
    cfg = load_config("pretrain/fashion_mnist", ["data.max_images=64", "optim.batch_size=16"])
    out = viz.visualize(ckpt, tmp_path, cfg, num_sequences=1, max_batches=1, split="test",
                        first_clusters=2)
    assert out["split"] == "test" and out["sequences"] == 8
    check_png(tmp_path / "predictions.png", (150, 200))
    check_png(tmp_path / "loss_per_position.png", (600, 250))
    # CS: image 0's cluster 0 is segment 0, so image 0's "first clusters" are its cluster 1 only
    table = torch.tensor(out["loss_per_position"])
    assert out["first_cluster_loss_image0"] == pytest.approx(table[0, 1].item())
    assert out["first_cluster_loss_later_images"] == pytest.approx(table[1, :2].mean().item())


def test_cli_viz(tmp_path, capsys):
    from star_mamba.cli import main
    model = tiny_model(img_size=16, patch_size=4, in_chans=3, images_per_sequence=2)
    save_pretrain(tmp_path / "run" / "checkpoint-latest.pth", model)
    args = ["viz", "--checkpoint", str(tmp_path / "run"), "--max-batches", "1", "--split", "train",
            "--set", "data.name=synthetic", "--set", "data.synthetic_images=16",
            "--set", "optim.batch_size=8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 sequences of K=2" in printed and "first 1 cluster(s)" in printed
    saved = json.loads((tmp_path / "run" / "viz" / "loss_per_position.json").read_text())
    assert saved["sequences"] == 4 and saved["split"] == "train"
    check_png(tmp_path / "run" / "viz" / "predictions.png", (150, 200))
    assert main(["viz", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "not found" in capsys.readouterr().err
