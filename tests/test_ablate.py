"""star-mamba ablate: the grid, its validation, a tiny end-to-end run and resuming it."""
import json

import pytest
import torch

from star_mamba.engine.config import from_dict
from star_mamba.evaluation.probe import probe_features
from star_mamba.tools.ablate import (AXES, BASE, Budget, Point, ablate, check_point, grid_points,
                                     parse_axes, to_markdown)
from star_mamba.cli import main

from .conftest import requires_fashion_mnist


def test_one_factor_grid_has_base_each_other_value_and_scratch():
    points = grid_points()
    assert points[0] == Point() and points[-1].scratch
    assert len(points) == 1 + sum(len(v) - 1 for v in AXES.values()) + 1
    assert len({p.name for p in points}) == len(points)
    for p in points[1:-1]:
        assert len(p.differs_from_base()) == 1


def test_full_grid_merges_positions_without_separator():
    points = grid_points(parse_axes(["sep=none,zeros", "K=1,2", "c=2", "space=pixel"]), full=True,
                         scratch=False)
    # none x 4 positions collapses to one point per K; zeros keeps its 4 positions
    assert len(points) == 2 * 1 + 2 * 4
    assert {p.separator_position for p in points if p.separator == "none"} == {"SC"}


def test_separator_space_axis_names_and_merges():
    points = grid_points(parse_axes(["sep=identity,none,embedding", "space=pixel,token", "K=4",
                                     "c=2", "pos=SC"]), full=True, scratch=False)
    # none and embedding have no space of their own: one point each; identity keeps both
    assert [p.name for p in points] == ["sep-identity_pos-SC_K-4_c-2",
                                        "sep-identity_pos-SC_K-4_c-2_space-token",
                                        "sep-none_pos-SC_K-4_c-2", "sep-embedding_pos-SC_K-4_c-2"]
    assert [p.separator_space for p in points] == ["pixel", "token", "pixel", "pixel"]
    with pytest.raises(ValueError, match="allowed separator_space values are pixel, token"):
        parse_axes(["space=tokens"])


def test_parse_axes_errors():
    assert parse_axes(["c=1,4"])["cluster_size"] == (1, 4)
    assert parse_axes(["images_per_sequence=8"])["images_per_sequence"] == (8,)
    with pytest.raises(ValueError, match="allowed images_per_sequence values are 1, 2, 4, 8"):
        parse_axes(["K=3"])
    with pytest.raises(ValueError, match="takes int values"):
        parse_axes(["K=four"])
    with pytest.raises(ValueError, match="expected NAME=V1,V2"):
        parse_axes(["colour=red"])
    with pytest.raises(ValueError, match="allowed separator values"):
        parse_axes(["sep=commas"])


def test_check_point_rejects_impossible_settings():
    assert check_point(Point(cluster_size=4), img_size=32, patch_size=4, batch_size=32) is None
    assert "does not divide" in check_point(Point(cluster_size=4), 24, 4, 32)
    assert "not a multiple of K=8" in check_point(Point(images_per_sequence=8), 32, 4, 36)
    with pytest.raises(ValueError, match="probe"):
        Budget(probe="knn").validate()
    with pytest.raises(ValueError, match="the linear probe is fitted to convergence"):
        Budget(probe_blr=0.1).validate()
    Budget(probe="finetune", probe_blr=0.1).validate()


TINY = Budget(depth=2, pretrain_images=64, probe_images=128, eval_images=64,
              extra=("model.decoder_depth=2", "optim.batch_size=16", "run.save_every_steps=2"))


@requires_fashion_mnist
def test_tiny_grid_runs_writes_the_report_and_resumes(tmp_path):
    axes = parse_axes(["sep=identity,none", "pos=SC", "K=4", "c=2", "space=pixel"])
    rows = ablate(tmp_path, TINY, axes)
    assert [r["name"] for r in rows] == ["sep-identity_pos-SC_K-4_c-2", "sep-none_pos-SC_K-4_c-2",
                                         "scratch"]
    for r in rows:  # the converged linear probe and k-NN of each backbone, on its features
        probe_dir = tmp_path / "runs" / r["name"] / "probe"
        run = from_dict(json.loads((probe_dir / "linprobe.json").read_text())["config"])
        (train_x, train_y), (test_x, test_y) = (
            (f["features"], f["labels"]) for f in (
                torch.load(probe_dir / f"features-{split}.pt", weights_only=True)
                for split in ("train", "test")))
        assert (len(train_y), len(test_y)) == (r["n_train"], r["n_test"]) == (128, 64)
        again = probe_features(train_x, train_y, test_x, test_y, run.probe, seed=run.run.seed)
        assert r["top1"] == r["linear_probe_top1"] == again["linear_probe_top1"]
        assert r["knn_top1"] == again["knn_top1"]
        assert (r["pretrain_loss"] is None) == r["scratch"]
    pixels = json.loads((tmp_path / "raw_pixels.json").read_text())["result"]
    assert (pixels["n_train"], pixels["n_test"], pixels["feature_dim"]) == (128, 64, 32 * 32)
    md = (tmp_path / "ablation.md").read_text()
    assert "| separator | none |" in md and "no pretraining" in md and "depth 2" in md
    assert "| linear probe top-1 (%) | k-NN top-1 (%) |" in md
    assert (f"| - | raw pixels | {pixels['linear_probe_top1']:.2f} | "
            f"{pixels['knn_top1']:.2f} | - |") in md
    assert (tmp_path / "ablation.png").stat().st_size > 5000
    report = json.loads((tmp_path / "ablation.json").read_text())
    assert report == json.loads(json.dumps(dict(points=rows, raw_pixels=pixels)))
    assert "batch 16" in md

    # interrupted: the first point after its probe's features, the second after its pretraining
    first, point = (tmp_path / "runs" / r["name"] for r in rows[:2])
    features = first / "probe" / "features-train.pt"
    stamps = [f.stat().st_mtime_ns for f in (features, tmp_path / "raw_pixels.json")]
    (first / "result.json").unlink()
    (first / "probe" / "linprobe.json").unlink()
    ckpt = point / "pretrain" / "checkpoint-latest.pth"
    stamp = ckpt.stat().st_mtime_ns
    (point / "result.json").unlink()
    for f in (point / "probe").iterdir():
        if f.is_file():
            f.unlink()
    again = ablate(tmp_path, TINY, axes)
    assert ckpt.stat().st_mtime_ns == stamp  # the finished pretraining was not redone
    # nor the first point's extraction, nor the baseline
    assert [f.stat().st_mtime_ns for f in (features, tmp_path / "raw_pixels.json")] == stamps
    assert [r["top1"] for r in again] == [r["top1"] for r in rows]  # deterministic on CPU
    assert [r["knn_top1"] for r in again] == [r["knn_top1"] for r in rows]
    assert (point / "result.json").exists()

    with pytest.raises(ValueError, match="another budget"):
        ablate(tmp_path, Budget(depth=3), axes)


def test_cli_dry_run_and_errors(capsys):
    assert main(["ablate", "--dry-run", "--axis", "K=1,8", "--axis", "sep=identity",
                 "--axis", "pos=SC", "--axis", "c=2", "--axis", "space=pixel", "--no-scratch"]) == 0
    out = capsys.readouterr().out
    assert "3 points" in out and "sep-identity_pos-SC_K-8_c-2" in out
    assert main(["ablate", "--dry-run", "--axis", "c=3"]) == 2
    assert "allowed cluster_size values" in capsys.readouterr().err
    assert BASE["separator"] == "identity"


@requires_fashion_mnist
def test_runner_shares_a_pretraining_takes_any_probe_and_resumes(tmp_path):
    from star_mamba.checkpoint import load_checkpoint
    from star_mamba.tools.runner import Pretraining, Probe, pretrain_then_probe

    calls = []

    def steps_probe(probe, pretrained, out_dir):  # a probe kind given as a callable
        calls.append((pretrained, out_dir))
        step = load_checkpoint(pretrained)["state"]["step"] if pretrained else 0
        return dict(top1=float(len(probe.overrides)), step=step)

    pre = Pretraining(("model.depth=2", "model.decoder_depth=2", "data.max_images=64",
                       "optim.batch_size=16", "optim.epochs=1", "run.progress=false",
                       "run.tensorboard=false"), run_dir=tmp_path / "pre")
    a = pretrain_then_probe(tmp_path / "a", Probe(steps_probe, overrides=("x",)), pre,
                            meta=dict(arm="a"))
    ckpt = tmp_path / "pre" / "checkpoint-latest.pth"
    stamp = ckpt.stat().st_mtime_ns
    b = pretrain_then_probe(tmp_path / "b", Probe(steps_probe, overrides=("x", "y")), pre,
                            probe_dir=tmp_path / "b")
    assert ckpt.stat().st_mtime_ns == stamp  # the shared pretraining ran once
    assert calls == [(ckpt, tmp_path / "a" / "probe"), (ckpt, tmp_path / "b")]
    assert (a["arm"], a["top1"], a["step"], b["top1"]) == ("a", 1.0, 4, 2.0)
    assert a["pretrain_loss"] > 0 and a["seconds"] >= a["probe_seconds"]

    # finished runs are read back from result.json: the probe is not called again
    assert pretrain_then_probe(tmp_path / "a", Probe(steps_probe), pre) == json.loads(json.dumps(a))
    assert len(calls) == 2
    scratch = pretrain_then_probe(tmp_path / "s", Probe(steps_probe))
    assert calls[-1] == (None, tmp_path / "s" / "probe") and scratch["pretrain_loss"] is None
    with pytest.raises(ValueError, match="invalid probe kind 'knn'; allowed: representation, "
                                         "finetune"):
        pretrain_then_probe(tmp_path / "c", Probe("knn"), pre)


def test_report_of_each_probe_shows_the_raw_pixel_baseline():
    row = dict(name="sep-identity_pos-SC_K-4_c-2", scratch=False, **BASE, top1=61.5,
               knn_top1=58.25, pretrain_loss=0.5, seconds=120)
    scratch = dict(row, name="scratch", scratch=True, top1=40.0, knn_top1=35.5,
                   pretrain_loss=None)
    pixels = dict(linear_probe_top1=84.74, knn_top1=86.17, knn_k=20, seconds=397)
    md = to_markdown([row, scratch], Budget(), "star-mamba ablate", 32, pixels)
    lines = md.splitlines()
    assert lines[0] == ("| axis | setting | linear probe top-1 (%) | k-NN top-1 (%) | "
                        "pretrain loss | minutes |")
    assert "| base | sep=identity, pos=SC, K=4, c=2 | 61.50 | 58.25 | 0.5000 | 2.0 |" in lines
    assert "| - | no pretraining | 40.00 | 35.50 | - | 2.0 |" in lines
    assert "| - | raw pixels | 84.74 | 86.17 | - | 6.6 |" in lines
    assert "20-NN (cosine)" in md
    finetuned = [dict(r, knn_top1=None) for r in (row, scratch)]
    md = to_markdown(finetuned, Budget(probe="finetune"), "star-mamba ablate", 32, pixels)
    lines = md.splitlines()
    assert lines[0] == "| axis | setting | fine-tune top-1 (%) | pretrain loss | minutes |"
    assert "| base | sep=identity, pos=SC, K=4, c=2 | 61.50 | 0.5000 | 2.0 |" in lines
    assert "| - | raw pixels (linear probe) | 84.74 | - | 6.6 |" in lines
