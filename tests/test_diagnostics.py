"""Cross-image diagnostics (evaluation/diagnostics.py, data/build.py): slot tables per layout, rotations, slot
losses against the model's loss, the paired gap against hand-built placements, attention
weights against the module, the held-out batch, and the wiring into pretraining runs."""
import json
import math
from pathlib import Path

import pytest
import torch

from star_mamba import sequence as seq
from star_mamba.config import SEPARATOR_POSITIONS
from star_mamba.data import FashionMNIST, SyntheticImages
from star_mamba.data import build as data_build
from star_mamba.evaluation import diagnostics as diag
from star_mamba.engine.config import load_config
from star_mamba.engine.metrics import read_metrics
from star_mamba.tasks.pretrain import pretrain
from star_mamba.errors import ConfigError
from star_mamba.tools.viz import loss_per_position

from .conftest import (assert_same_tensors, logged_losses, micro_pretrain, pretrain_config,
                       pretrain_one_and_two_processes, requires_fashion_mnist)

LAYOUTS = [dict(separator="identity", separator_position=p) for p in SEPARATOR_POSITIONS] + [
    dict(separator="none")]


def layout_id(layout: dict) -> str:
    return layout.get("separator_position", "none") if layout["separator"] != "none" else "none"


def contextual(model):
    """Redraw the decoder's projections larger so that predictions depend clearly on the
    context (at initialisation they barely do); deterministic."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.decoder.blocks:
            for lin in (block.attn.q, block.attn.kv, block.attn.proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.5)
        for lin in (model.decoder.enc2dec, model.decoder.pred):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.5)
    return model


# ------------------------------------------------------------------------------ slot tables

@pytest.mark.parametrize("position,has_sep,expected", [
    ("SC", True, [0, 0, 0, 1, 1, 1]),  # S c0 c1 | S c0 c1
    ("CS", True, [0, 0, 0, 1, 1, 1]),  # c0 c1 S | c0 c1 S: the separator closes its image
    ("SCS", True, [0, 0, 0, 0, 1, 1, 1, 1]),  # S c0 S c1 | ...
    ("CSC", True, [0, 0, 0, 0, 1, 1, 1, 1]),  # c0 S c1 S | ...
    ("SC", False, [0, 0, 1, 1]),  # c0 c1 | c0 c1
])
def test_segment_slots_exact(position, has_sep, expected):
    assert seq.segment_slots(2, position, has_sep, 2).tolist() == expected


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_segment_slots_agree_with_the_cluster_positions(layout):
    G, K = 4, 3
    has_sep = layout["separator"] != "none"
    pos = layout.get("separator_position", "SC")
    slots = seq.segment_slots(G, pos, has_sep, K)
    is_sep = seq.separator_segment_mask(G, pos, has_sep, K)
    assert slots.shape == is_sep.shape
    for k in range(K):
        for g in range(G):
            assert slots[seq.cluster_segment_index(k, g, G, pos, has_sep)] == k
        assert int(is_sep[slots == k].sum()) == (G if pos in ("SCS", "CSC") else 1) * has_sep


@pytest.mark.parametrize("layout,slot,is_cluster", [
    (dict(separator_position="SC"), [0, 1, 1, 2, 2], [1, 0, 1, 0, 1]),  # S c | S c | S c
    (dict(separator_position="CS"), [0, 1, 1, 2, 2], [0, 1, 0, 1, 0]),  # c S | c S | c S
    (dict(separator_position="SCS"), [0, 1, 1, 2, 2], [1, 0, 1, 0, 1]),
    (dict(separator_position="CSC"), [0, 1, 1, 2, 2], [0, 1, 0, 1, 0]),
    (dict(separator="none"), [1, 2], [1, 1]),  # c | c | c
])
def test_target_slots_one_cluster_per_image(layout, slot, is_cluster):
    cfg = micro_pretrain(cluster_size=4, images_per_sequence=3, **layout).cfg  # G = 1
    targets = diag.target_slots(cfg)
    assert targets.slot.tolist() == slot
    assert targets.is_cluster.tolist() == [bool(x) for x in is_cluster]


def test_rotation_index_pairs_first_and_last_placements():
    rot = diag.rotation_index(6, 3)
    assert rot.tolist() == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [3, 4, 5], [4, 5, 3], [5, 3, 4]]
    for m, k in ((6, 3), (8, 4), (4, 2), (5, 1)):
        rot = diag.rotation_index(m, k)
        for s in range(k):  # every image once in every slot
            assert sorted(rot[:, s].tolist()) == list(range(m))
        for i in range(m):
            first = rot[(rot[:, 0] == i).nonzero().item()]
            last = rot[(rot[:, k - 1] == i).nonzero().item()]
            assert torch.equal(first[1:], last[:-1])  # the same others, in the same order
    with pytest.raises(ValueError, match="7 images are not a positive multiple of .*=2"):
        diag.rotation_index(7, 2)


# ------------------------------------------------------------------------------ slot losses

@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
@pytest.mark.parametrize("separator_loss", [True, False])
def test_slot_losses_recompose_the_model_loss(layout, separator_loss):
    if layout["separator"] == "none" and not separator_loss:
        pytest.skip("no separator targets either way")
    model = contextual(micro_pretrain(images_per_sequence=3, separator_loss=separator_loss,
                                      **layout))
    cfg = model.cfg
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = diag.cross_image_diagnostics(model, images, batch_size=4)
    targets = diag.target_slots(cfg)
    n_slot = [int((targets.is_cluster & (targets.slot == k)).sum()) for k in range(3)]
    n_sep = int((~targets.is_cluster).sum())
    clusters = sum(n * out[f"slot_loss/{k}"] for k, n in enumerate(n_slot))
    if separator_loss and n_sep:
        expected = (clusters + n_sep * out["separator_loss"]) / (sum(n_slot) + n_sep)
    else:
        expected = clusters / sum(n_slot)
    assert out["loss"] == pytest.approx(expected, rel=1e-5)
    assert (out["separator_loss"] is None) == (layout["separator"] == "none")
    # the same numbers through viz's per-cluster table of the rotated sequences
    rotated = images[diag.rotation_index(6, 3).reshape(-1)]
    with torch.no_grad():
        o = model(rotated)
    table = loss_per_position(o.patch_loss, cfg)  # (K, G), NaN: never predicted
    for k in range(3):
        assert out[f"slot_loss/{k}"] == pytest.approx(torch.nanmean(table[k]).item(), rel=1e-5)
    assert out["loss"] == pytest.approx(o.loss.item(), rel=1e-5)


# ------------------------------------------------------------------------------ paired gap

def image_loss(model, images: torch.Tensor, slot: int) -> float:
    """Mean per-patch MSE of the clusters of the image in ``slot`` of one sequence, by hand."""
    cfg = model.cfg
    with torch.no_grad():
        o = model(images)
    losses = []
    for g in range(cfg.clusters_per_image):
        t = seq.cluster_segment_index(slot, g, cfg.clusters_per_image, cfg.separator_position,
                                      cfg.has_separator)
        if t > 0:  # segment 0 is never a target
            losses.append(((o.pred[0, t - 1] - o.target[0, t - 1]) ** 2).mean().item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_paired_gap_equals_hand_built_placements(layout):
    """Image i first (then the rest of its group in order) vs last (after the same images in
    the same order), built by hand from the group, for every image of two groups of K = 3."""
    model = contextual(micro_pretrain(images_per_sequence=3, **layout))
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    gaps = []
    for group in (images[:3], images[3:]):
        for j in range(3):
            others = [group[(j + i) % 3] for i in (1, 2)]
            first = torch.stack([group[j], *others])
            last = torch.stack([*others, group[j]])
            gaps.append(image_loss(model, last, 2) - image_loss(model, first, 0))
    gaps = torch.tensor(gaps, dtype=torch.float64)
    out = diag.cross_image_diagnostics(model, images, batch_size=2)
    assert out["paired_gap_mean"] == pytest.approx(gaps.mean().item(), abs=1e-6)
    assert out["paired_gap_sem"] == pytest.approx(gaps.std().item() / math.sqrt(6), abs=1e-6)
    assert abs(out["paired_gap_mean"]) > 1e-3  # the context matters for this model


def test_paired_gap_is_zero_when_predictions_ignore_the_context():
    """Every decoder block's attention output zeroed: a prediction depends only on its query
    position, the same in every slot, so each image's loss is the same first and last."""
    model = contextual(micro_pretrain(images_per_sequence=4))
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    out = diag.cross_image_diagnostics(model, torch.randn(8, 1, 8, 8), batch_size=3)
    assert out["paired_gap_mean"] == pytest.approx(0.0, abs=1e-7)
    assert out["paired_gap_sem"] == pytest.approx(0.0, abs=1e-7)
    assert len({round(out[f"slot_loss/{k}"], 6) for k in range(4)}) == 1


# ------------------------------------------------------------------------------ attention

def test_attention_probs_reproduce_the_cross_attention_output():
    model = contextual(micro_pretrain(images_per_sequence=2))
    attn = model.decoder.blocks[0].attn
    b, L, d = 3, model.mask.shape[0], model.cfg.decoder_dim
    gen = torch.Generator().manual_seed(0)
    x, memory = torch.randn(b, L, d, generator=gen), torch.randn(b, L, d, generator=gen)
    for mask in (model.mask, None):
        probs = attn.attention_probs(x, memory, mask)  # (B, h, L, L)
        assert probs.shape == (b, attn.num_heads, L, L)
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, attn.num_heads, L))
        if mask is not None:
            assert (probs[..., ~mask] == 0).all() and (probs[..., mask] > 0).all()
        _, _, v = attn.heads(x, memory)
        merged = (probs @ v).transpose(1, 2).reshape(b, L, d)
        torch.testing.assert_close(attn.proj(merged), attn(x, memory, mask), rtol=1e-4, atol=1e-5)


def test_own_image_keys_exact_for_one_cluster_per_image():
    """SC, G = 1, K = 2: segments S c | S c; c^2 = 16 tokens each; targets 1, 2, 3 (query
    rows 0-15, 16-31, 32-47) see segments 0, 0-1, 0-2 (key columns 0-15, 0-31, 0-47). Own
    keys: target 1 (image 0's cluster) segment 0, target 2 (image 1's separator) none, target
    3 (image 1's cluster) segment 2; only target 3 is measured."""
    model = micro_pretrain(cluster_size=4, images_per_sequence=2)
    own, measured = diag.own_image_keys(model.cfg, model.mask)
    expected = torch.zeros(48, 48, dtype=torch.bool)
    expected[:16, :16] = True
    expected[32:, 32:] = True
    assert torch.equal(own, expected)
    assert measured.tolist() == [False] * 32 + [True] * 16
    cs = micro_pretrain(cluster_size=4, images_per_sequence=2, separator_position="CS")
    own, measured = diag.own_image_keys(cs.cfg, cs.mask)  # c S | c S: image 1's c sees no own key
    assert not measured.any()
    out = diag.cross_image_diagnostics(cs, torch.randn(4, 1, 8, 8))
    assert out["attn_share_mean"] is None and "attn_share/block0" not in out
    assert out["paired_gap_mean"] is not None


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_attention_share_by_hand(layout):
    """Block i's share: for each sequence and each query of an image-cluster target of slot
    k >= 1, the head-averaged attention on visible keys of image k, summed by plain loops over
    segments; the uniform share is (own visible keys) / (visible keys)."""
    model = contextual(micro_pretrain(images_per_sequence=2, **layout))
    cfg = model.cfg
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = diag.cross_image_diagnostics(model, images, batch_size=4)
    rotated = images[diag.rotation_index(4, 2).reshape(-1)]
    seen = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a))
             for i, blk in enumerate(model.decoder.blocks)]
    with torch.no_grad():
        model(rotated)
    for h in hooks:
        h.remove()
    per_image = len(seq.segment_layout(cfg.clusters_per_image, cfg.separator_position,
                                       cfg.has_separator))
    is_sep = seq.separator_segment_mask(cfg.clusters_per_image, cfg.separator_position,
                                        cfg.has_separator, 2)
    c2, T = cfg.tokens_per_segment, cfg.num_segments
    for i, block in enumerate(model.decoder.blocks):
        x, memory, mask = seen[i]
        probs = block.attn.attention_probs(x, memory, mask).mean(1)  # (B, L, L)
        shares, uniforms = [], []
        for t in range(1, T):  # target segment t, predicted by query block t-1
            k = t // per_image
            if k == 0 or is_sep[t]:
                continue
            own = [s for s in range(t) if s // per_image == k]  # visible: segments 0..t-1
            if not own:
                continue
            cols = [s * c2 + j for s in own for j in range(c2)]
            for r in range((t - 1) * c2, t * c2):
                shares += probs[:, r, cols].sum(-1).tolist()
                uniforms += [len(own) / t] * probs.shape[0]
        assert out[f"attn_share/block{i}"] == pytest.approx(sum(shares) / len(shares), rel=1e-5)
        assert out["attn_uniform_mean"] == pytest.approx(sum(uniforms) / len(uniforms), rel=1e-6)
        assert out[f"attn_ratio/block{i}"] == pytest.approx(
            out[f"attn_share/block{i}"] / out["attn_uniform_mean"], rel=1e-9)


# ------------------------------------------------------------------------------ the API

def test_k1_has_no_gap_and_no_attention_share():
    model = micro_pretrain(images_per_sequence=1, separator="none", cluster_size=1)
    out = diag.cross_image_diagnostics(model, torch.randn(3, 1, 8, 8))
    assert out["paired_gap_mean"] is None and out["paired_gap_sem"] is None
    assert out["attn_share_mean"] is out["attn_uniform_mean"] is out["attn_ratio_mean"] is None
    assert not any("/block" in key for key in out)
    assert out["separator_loss"] is None and out["images"] == 3
    assert out["slot_loss/0"] > 0 and "slot_loss/1" not in out
    sc = micro_pretrain(images_per_sequence=1)  # S c0 .. c3: the separator is never a target
    assert diag.cross_image_diagnostics(sc, torch.randn(2, 1, 8, 8))["separator_loss"] is None


def test_deterministic_leaves_mode_and_random_state_alone():
    model = contextual(micro_pretrain(images_per_sequence=2, drop_path_rate=0.5)).train()
    images = torch.randn(8, 1, 8, 8)
    rng = torch.get_rng_state()
    a = diag.cross_image_diagnostics(model, images, batch_size=3)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert a == diag.cross_image_diagnostics(model.eval(), images, batch_size=3)  # no drop path
    assert not model.training
    b = diag.cross_image_diagnostics(model, images, batch_size=8)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert all(not blk.attn._forward_pre_hooks for blk in model.decoder.blocks)  # hooks removed


def test_bf16_autocast_forward_gives_close_numbers():
    model = contextual(micro_pretrain(images_per_sequence=2))
    images = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    fp32 = diag.cross_image_diagnostics(model, images)
    bf16 = diag.cross_image_diagnostics(model, images, amp_dtype=torch.bfloat16)
    assert fp32.keys() == bf16.keys()
    for key in ("loss", "slot_loss/0", "slot_loss/1", "attn_share_mean", "attn_uniform_mean"):
        assert bf16[key] == pytest.approx(fp32[key], rel=5e-2), key
    assert bf16["attn_uniform_mean"] == fp32["attn_uniform_mean"]  # counts, not weights


def test_bad_inputs_are_clear_errors():
    model = micro_pretrain(images_per_sequence=2)
    with pytest.raises(ValueError, match="not divisible by images_per_sequence=2"):
        diag.cross_image_diagnostics(model, torch.randn(3, 1, 8, 8))
    with pytest.raises(ValueError, match="do not match the config"):
        diag.cross_image_diagnostics(model, torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="needs a StarPretrain"):
        diag.cross_image_diagnostics(torch.nn.Linear(2, 2), torch.randn(2, 1, 8, 8))


# ------------------------------------------------------------------------------ held-out images

def test_held_out_synthetic_images_follow_the_training_ones(tmp_path):
    cfg = pretrain_config(tmp_path)  # 64 synthetic images, K = 2
    model_cfg = cfg.model.star_config()
    held = data_build.held_out_images(cfg.data, model_cfg, 11)  # 10: a multiple of K
    assert held.shape == (10, 1, 16, 16) and held.dtype == torch.float32
    assert torch.equal(held, data_build.held_out_images(cfg.data, model_cfg, 11))
    every = SyntheticImages(64 + 10, img_size=16, in_chans=1)  # the generator's images 64..73
    picks = 64 + torch.randperm(10, generator=torch.Generator().manual_seed(data_build.HELD_OUT_SEED))
    assert torch.equal(held, torch.stack([every[i][0] for i in picks.tolist()]))
    with pytest.raises(ConfigError,
                       match=r"run.diag_images=1 is fewer than model.images_per_sequence=2"):
        data_build.held_out_images(cfg.data, model_cfg, 1)


@requires_fashion_mnist
def test_held_out_fashion_mnist_images_come_from_the_test_split():
    cfg = load_config("pretrain/fashion_mnist")
    model_cfg = cfg.model.star_config()
    held = data_build.held_out_images(cfg.data, model_cfg, 8)
    assert held.shape == (8, 1, 32, 32)
    test = FashionMNIST(split="test", img_size=32, in_chans=1)
    picks = torch.randperm(len(test), generator=torch.Generator().manual_seed(data_build.HELD_OUT_SEED))
    assert torch.equal(held, torch.stack([test[i][0] for i in picks[:8].tolist()]))


def test_held_out_image_folder_uses_the_val_split(shapes_8, tmp_path):
    cfg = load_config("pretrain/fashion_mnist", [
        "data.name=imagefolder", f"data.root={shapes_8}", "model.in_chans=3", "model.img_size=32"])
    held = data_build.held_out_images(cfg.data, cfg.model.star_config(), 12)
    assert held.shape == (12, 3, 32, 32)
    with pytest.raises(ConfigError,
                       match=r"diag_images=20 but the imagefolder eval split holds 16"):
        data_build.held_out_images(cfg.data, cfg.model.star_config(), 20)
    fewer = data_build.held_out_images(cfg.data, cfg.model.star_config(), 20, allow_fewer=True)
    assert fewer.shape == (16, 3, 32, 32)  # the whole val split
    assert torch.equal(fewer[:12], held)  # the same seeded draw, cut shorter


def test_pretraining_without_an_eval_split_warns_once_and_trains(tmp_path):
    """An ImageFolder tree with train/ only: the run trains, warns once at the first
    diagnostic, and logs no diagnostics."""
    import shutil

    from .conftest import folder_pretrain_overrides, make_shapes
    make_shapes(tmp_path / "shapes", per_class=2)
    shutil.rmtree(tmp_path / "shapes" / "val")
    out = tmp_path / "out"
    summary = pretrain(load_config("pretrain/fashion_mnist", folder_pretrain_overrides(
        tmp_path / "shapes", out, "run.diag_every=1", "run.diag_images=4")))
    assert summary["step"] == 2
    log = (out / "log.txt").read_text()
    assert log.count("cross-image diagnostics off for this run") == 1
    assert "val does not exist" in log and not diag_rows(out)


# ------------------------------------------------------------------------------ in training

def diag_rows(out) -> list[dict]:
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "diag" in r]


def test_training_logs_diagnostics_without_changing_the_run(tmp_path):
    """diag_every=3 over 8 steps: rows at steps 3 and 6 with every key; the losses and the
    final weights are bit-identical to the same run without diagnostics; an interrupted run
    (stopped at step 5) resumed ends on the same weights and logs each diagnostic once."""
    from star_mamba import checkpoint as ckpt
    with_diag = pretrain(pretrain_config(tmp_path / "on", "optim.epochs=1", "run.diag_every=3",
                                         "run.diag_images=8", "model.drop_path_rate=0.1"))
    pretrain(pretrain_config(tmp_path / "off", "optim.epochs=1", "run.diag_every=0",
                             "model.drop_path_rate=0.1"))
    assert with_diag["step"] == 8
    rows = diag_rows(tmp_path / "on")
    assert [r["step"] for r in rows] == [3, 6] and all("loss" not in r for r in rows)
    keys = {"loss", "slot_loss/0", "slot_loss/1", "separator_loss", "paired_gap_mean",
            "paired_gap_sem", "attn_share/block0", "attn_share/block1", "attn_ratio/block0",
            "attn_ratio/block1", "attn_share_mean", "attn_uniform_mean", "attn_ratio_mean",
            "images"}
    assert all(set(r["diag"]) == keys and r["diag"]["images"] == 8 for r in rows)
    assert logged_losses(tmp_path / "on") == logged_losses(tmp_path / "off")
    assert_same_tensors(ckpt.load_checkpoint(tmp_path / "on" / ckpt.LATEST)["model"],
                        ckpt.load_checkpoint(tmp_path / "off" / ckpt.LATEST)["model"], "weights")
    part = tmp_path / "part"
    sets = ("optim.epochs=1", "run.diag_every=3", "run.diag_images=8", "model.drop_path_rate=0.1",
            "run.save_every_steps=4")
    assert pretrain(pretrain_config(part, *sets, "run.max_steps=5"))["step"] == 5
    assert pretrain(pretrain_config(part, *sets))["step"] == 8
    assert_same_tensors(ckpt.load_checkpoint(tmp_path / "on" / ckpt.LATEST)["model"],
                        ckpt.load_checkpoint(part / ckpt.LATEST)["model"], "resumed weights")
    assert diag_rows(part) == rows  # the same numbers, step 3 once, step 6 after the resume
    assert "diagnostics on 8 held-out images" in (part / "log.txt").read_text()


def test_metric_writer_sends_a_diag_row_to_tensorboard_as_tagged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from star_mamba.engine.metrics import MetricWriter
    writer = MetricWriter(tmp_path)
    writer.write(5, dict(epoch=0, loss=0.5))
    writer.write(5, dict(epoch=0, diag={"slot_loss/0": 0.25, "paired_gap_mean": None, "images": 8}))
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["diag/images", "diag/slot_loss/0", "loss"]
    assert [(e.step, e.value) for e in events.Scalars("diag/slot_loss/0")] == [(5, 0.25)]
    assert read_metrics(tmp_path / "metrics.jsonl")[1] == {
        "step": 5, "epoch": 0, "diag": {"slot_loss/0": 0.25, "paired_gap_mean": None, "images": 8}}


def test_diagnostics_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"run.diag_every=-1"):
        pretrain(pretrain_config(tmp_path, "run.diag_every=-1"))
    with pytest.raises(ValueError, match=r"run.diag_images=0"):
        pretrain(pretrain_config(tmp_path, "run.diag_images=0"))
    with pytest.raises(ConfigError, match=r"diag_images=1 is fewer than"):
        pretrain(pretrain_config(tmp_path, "run.diag_images=1"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_torchrun_diagnostics_on_rank_0_do_not_hang(tmp_path):
    """2 processes, diagnostics every 2 steps on rank 0 only: the run finishes, logs each once,
    with the numbers of the 1-process run (same weights)."""
    one, two = pretrain_one_and_two_processes(tmp_path, "run.diag_every=2", "run.diag_images=8")
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    a, b = diag_rows(tmp_path / "one"), diag_rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4]
    for ra, rb in zip(a, b):
        for key, value in ra["diag"].items():
            assert rb["diag"][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


# ------------------------------------------------------------------------------ star-mamba viz

def test_viz_draws_the_logged_diagnostics_and_the_checkpoint_values(tmp_path):
    from PIL import Image

    from star_mamba.tools import viz
    cfg = pretrain_config(tmp_path / "run", "optim.epochs=1", "run.diag_every=2",
                          "run.diag_images=8")
    pretrain(cfg)
    out = viz.visualize(tmp_path / "run", tmp_path / "viz", cfg, num_sequences=1, max_batches=1)
    png = tmp_path / "viz" / "diagnostics.png"
    with Image.open(png) as im:
        assert im.width > 1000 and im.height > 300
    rows = diag_rows(tmp_path / "run")
    steps = [r["step"] for r in rows]
    assert steps == [2, 4, 6, 8]
    drawn = out["diagnostics_series"]
    for key in ("slot_loss/0", "slot_loss/1", "paired_gap_mean", "attn_share/block0",
                "attn_share/block1", "attn_share_mean", "attn_uniform_mean"):
        assert drawn[key] == (steps, [r["diag"][key] for r in rows]), key
    gap = [(r["diag"]["paired_gap_mean"], r["diag"]["paired_gap_sem"]) for r in rows]
    assert drawn["paired_gap_high"] == (steps, [m + e for m, e in gap])
    assert drawn["paired_gap_low"] == (steps, [m - e for m, e in gap])
    # the checkpoint (step 8) recomputed on the same held-out batch: the logged numbers
    assert out["diagnostics_step"] == 8
    for key, value in rows[-1]["diag"].items():
        assert out["diagnostics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        if key in ("slot_loss/0", "attn_share_mean"):
            assert drawn[f"current/{key}"] == ([8], [out["diagnostics"][key]])
    saved = json.loads((tmp_path / "viz" / "diagnostics.json").read_text())
    assert saved["step"] == 8 and saved["logged"]["step"] == steps
    assert saved["current"]["paired_gap_mean"] == out["diagnostics"]["paired_gap_mean"]


def test_viz_diagnostics_of_a_k1_checkpoint_without_metrics(tmp_path, capsys):
    from star_mamba.checkpoint import atomic_save
    from star_mamba.cli import main
    model = micro_pretrain(images_per_sequence=1, separator="none", cluster_size=1)
    atomic_save(dict(model=model.state_dict(), model_config=model.cfg.to_dict()),
                tmp_path / "run" / "checkpoint-latest.pth")
    args = ["viz", "--checkpoint", str(tmp_path / "run"), "--max-batches", "1",
            "--set", "data.name=synthetic", "--set", "data.synthetic_images=16",
            "--set", "optim.batch_size=8", "--set", "run.diag_images=4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "diagnostics on 4 held-out images: slot loss" in printed and "paired gap" not in printed
    saved = json.loads((tmp_path / "run" / "viz" / "diagnostics.json").read_text())
    assert saved["step"] is None and saved["logged"] == {"step": []}
    assert saved["current"]["paired_gap_mean"] is None and saved["current"]["slot_loss/0"] > 0
    assert (tmp_path / "run" / "viz" / "diagnostics.png").stat().st_size > 1000
    assert main([*args, "--out", str(tmp_path / "plain"), "--no-diagnostics"]) == 0
    assert not (tmp_path / "plain" / "diagnostics.png").exists()
    assert (tmp_path / "plain" / "predictions.png").is_file()
