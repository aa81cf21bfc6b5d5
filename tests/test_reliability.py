"""Reliability: exact resume after SIGKILL (with DataLoader workers), atomic saves, bad images
counted over workers, bad numbers, bad configs, safe loading, and a torchrun job that survives
a killed worker."""
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from star_mamba.data.folder import build_image_folder
from star_mamba.data.transforms import build_pretrain_transform
from star_mamba import checkpoint as ckpt
from star_mamba.engine.config import load_config
from star_mamba.engine.metrics import read_metrics
from star_mamba.tasks.pretrain import pretrain
from star_mamba.engine.sampler import BlockShardSampler

from .conftest import (PRETRAIN_RUN, assert_same_tensors, folder_pretrain_overrides, make_shapes,
                       output_of, run_cli, tiny_classifier, truncate)

# drop path: a random generator that resuming must restore
TINY = [*PRETRAIN_RUN, "optim.lr=3e-3", "model.drop_path_rate=0.1"]


def steps_logged(out):
    return [row["step"] for row in read_metrics(Path(out) / "metrics.jsonl")]


def test_sigkill_with_workers_then_resume_gives_identical_weights(tmp_path):
    """2 DataLoader workers draw ARM's random crops and flips; the run is SIGKILLed right after
    step 7 (STAR_MAMBA_KILL_AT_STEP), its latest checkpoint being step 6's, mid-epoch. Run
    again, it resumes there, redoes step 7 and ends bit-identical to an uninterrupted run.

    All three runs are processes of their own with MKL's conditional numerical reproducibility
    on (MKL_CBWR): without it MKL may pick a different code path for differently aligned
    buffers, and two processes then differ in the last bit of a GEMM."""
    make_shapes(tmp_path / "shapes", per_class=8)  # 32 images: 8 steps of 4 per epoch
    common = ["optim.epochs=2", "data.num_workers=2", "model.drop_path_rate=0.1",
              "run.save_every_steps=3"]
    sets = folder_pretrain_overrides(tmp_path / "shapes", tmp_path / "killed", *common)
    reproducible = {"MKL_CBWR": "COMPATIBLE"}
    killed = run_cli("pretrain", sets, env={**reproducible, "STAR_MAMBA_KILL_AT_STEP": "7"})
    assert killed.returncode == -signal.SIGKILL, output_of(killed)
    assert ckpt.load_checkpoint(tmp_path / "killed" / ckpt.LATEST)["state"]["step"] == 6
    assert steps_logged(tmp_path / "killed") == list(range(1, 8))
    full_sets = folder_pretrain_overrides(tmp_path / "shapes", tmp_path / "full", *common)
    for done in (run_cli("pretrain", full_sets, env=reproducible),
                 run_cli("pretrain", sets, env=reproducible)):  # the second resumes by itself
        assert done.returncode == 0, output_of(done)
    assert re.search(r"resumed from \S+checkpoint-latest.pth at step 6, \d+ batches into epoch 1/\d+",
                     (tmp_path / "killed" / "log.txt").read_text())
    assert steps_logged(tmp_path / "killed") == list(range(1, 17))  # step 7 once, redone
    a = ckpt.load_checkpoint(tmp_path / "full" / ckpt.LATEST)
    b = ckpt.load_checkpoint(tmp_path / "killed" / ckpt.LATEST)
    assert a["state"]["step"] == b["state"]["step"] == 16
    assert_same_tensors(a["model"], b["model"], "weights")  # bit-identical on CPU


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / ckpt.LATEST
    ckpt.atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.LATEST]


def test_keep_last_numbered_checkpoints(tmp_path):
    summary = pretrain(load_config("pretrain/fashion_mnist", [
        *TINY, "optim.epochs=4", "run.keep_last=2", f"run.output_dir={tmp_path}"]))
    assert summary["epoch"] == 4
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    assert names == ["checkpoint-0003.pth", "checkpoint-0004.pth", ckpt.LATEST]


def make_odd_images(root):
    d = root / "train"
    (d / "good").mkdir(parents=True)
    (d / "empty_class").mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "good" / "ok.jpg")
    Image.fromarray(rgb).save(d / "good" / "truncated.jpg")
    truncate(d / "good" / "truncated.jpg")
    (d / "good" / "text.jpg").write_text("this is not a JPEG")
    (d / "good" / "zero.jpg").write_bytes(b"")
    Image.fromarray(rgb[..., 0]).save(d / "good" / "grey.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / "good" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "good" / "palette.png")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(d / "good" / "deep16.png")
    Image.fromarray(rgb[:1, :1]).save(d / "good" / "one_pixel.png")
    return {"truncated.jpg", "text.jpg", "zero.jpg"}


def test_odd_images_are_converted_and_broken_ones_skipped(tmp_path, star_log):
    broken = make_odd_images(tmp_path)
    ds = build_image_folder(tmp_path, "train", build_pretrain_transform(32), max_bad_fraction=0.5)
    assert ds.classes == ["empty_class", "good"] and len(ds) == 9
    out = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 32, 32) and torch.isfinite(x).all() for x, _ in out)
    assert {Path(p).name for p in ds.bad} == broken
    for name in broken:
        assert name in star_log.text
    strict = build_image_folder(tmp_path, "train", build_pretrain_transform(32), max_bad_fraction=0.15)
    with pytest.raises(RuntimeError, match="data.max_bad_fraction=0.15"):
        [strict[i] for i in range(len(strict))]


def test_unreadable_images_are_counted_over_workers_and_across_a_resume(tmp_path):
    """3 of 40 images are unreadable (7.5%), read by 2 workers: two lie in batches 0 and 2 of
    epoch 0 (worker 0), one in batch 5 (worker 1), so no worker alone sees more than 2.
    data.max_bad_fraction=0.08 (3.2 images): the epoch runs. 0.07 (2.8): the run stops right
    before step 6, whose batch holds the third, also when it was stopped after step 4 and
    resumed (the count is saved with the state). The log names the files."""
    files = make_shapes(tmp_path / "shapes", per_class=10)  # 40 images: 10 steps of 4
    order = list(BlockShardSampler(40, batch_size=4, seed=0))  # epoch 0, run.seed=0
    bad = [order[1], order[9], order[22]]  # in batches 0, 2 and 5
    assert min(abs(a - b) for a in bad for b in bad if a != b) > 1  # none replaces another
    truncate(files[bad[0]])
    files[bad[1]].write_text("not an image")
    files[bad[2]].write_bytes(b"")

    def run(out, fraction, *extra):
        return pretrain(load_config("pretrain/fashion_mnist", folder_pretrain_overrides(
            tmp_path / "shapes", tmp_path / out, "data.num_workers=2",
            f"data.max_bad_fraction={fraction}", *extra)))

    assert run("below", 0.08)["step"] == 10
    log = (tmp_path / "below" / "log.txt").read_text()
    for i in bad:  # each named once, with its dataset index
        assert log.count(f"unreadable image {files[i]} (") == 1 and f"dataset index {i})" in log
    assert run("above", 0.07, "run.max_steps=4")["step"] == 4
    assert ckpt.load_checkpoint(tmp_path / "above" / ckpt.LATEST)["state"]["bad_in_epoch"] == 2
    with pytest.raises(RuntimeError, match=r"3 unreadable images in epoch 1 \(all ranks\) of 40: "
                                           r"more than data.max_bad_fraction=0.07; stopping "
                                           r"before step 6") as stop:
        run("above", 0.07)
    assert str(files[bad[2]]) in str(stop.value)
    assert steps_logged(tmp_path / "above") == [1, 2, 3, 4, 5]
    assert str(files[bad[2]]) in (tmp_path / "above" / "log.txt").read_text()


def test_nonfinite_losses_skip_steps_then_stop_and_never_reach_a_checkpoint(tmp_path, monkeypatch):
    from star_mamba.data.synthetic import SyntheticImages
    original, calls = SyntheticImages.__getitem__, []

    def poisoned(self, index):  # after the first 2 steps (16 images) every image is NaN
        calls.append(index)
        x, y = original(self, index)
        return (x * float("nan") if len(calls) > 16 else x), y

    monkeypatch.setattr(SyntheticImages, "__getitem__", poisoned)
    cfg = load_config("pretrain/fashion_mnist", [
        *TINY, "optim.epochs=1", "run.max_nonfinite=3", "run.save_every_steps=1",
        "data.synthetic_images=80", f"run.output_dir={tmp_path}"])
    with pytest.raises(FloatingPointError, match="run.max_nonfinite=3"):
        pretrain(cfg)
    log = (tmp_path / "log.txt").read_text()
    assert "dataset indices [" in log and log.count("step skipped") == 3
    saved = ckpt.load_checkpoint(tmp_path / ckpt.LATEST)
    assert saved["state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr=-1.0"),
    ("optim.batch_size=7", "optim.batch_size=7"),
    ("model.img_size=18", "img_size=18"),
    ("model.name=star_mega", "model.name="),
    ("data.name=imagefolder", "in_chans=1"),
    ("model.separator=dots", "separator='dots'"),
])
def test_bad_configs_fail_before_training_and_name_the_field(tmp_path, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pretrain(load_config("pretrain/fashion_mnist", [*TINY, override, f"run.output_dir={tmp_path}"]))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_missing_data_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        pretrain(load_config("pretrain/fashion_mnist", [
            *TINY, "data.name=imagefolder", "model.in_chans=3", f"data.root={tmp_path / 'nowhere'}",
            f"run.output_dir={tmp_path / 'o'}"]))


def test_safetensors_round_trip_and_use_as_pretrained(tmp_path):
    pretrain(load_config("pretrain/fashion_mnist", [*TINY, "run.max_steps=2", f"run.output_dir={tmp_path}"]))
    out = ckpt.export_safetensors(tmp_path / ckpt.LATEST, tmp_path / "w.safetensors")
    back = ckpt.load_checkpoint(out)
    saved = ckpt.load_checkpoint(tmp_path / ckpt.LATEST)
    assert back["model_config"] == saved["model_config"]
    assert_same_tensors(back["model"], saved["model"], "safetensors")
    from star_mamba.models.convert import load_pretrained
    clf = tiny_classifier()
    report = load_pretrained(clf, out)
    assert "backbone.patch_embed.proj.weight" in report.loaded
    assert torch.equal(clf.backbone.patch_embed.proj.weight,
                       saved["model"]["encoder.patch_embed.proj.weight"])


def test_torchrun_job_survives_a_killed_worker(tmp_path):
    """torchrun --max-restarts: a worker SIGKILLed after step 5 -> the job restarts, resumes
    from the latest checkpoint and finishes."""
    sets = [*TINY, "optim.batch_size=4", "optim.epochs=2", "run.save_every_steps=1",
            f"run.output_dir={tmp_path}"]
    out = run_cli("pretrain", sets, "--nproc_per_node=2", "--max-restarts=1",
                  env={"STAR_MAMBA_KILL_AT_STEP": "5"}, timeout=600)
    assert out.returncode == 0, output_of(out)
    log = (tmp_path / "log.txt").read_text()
    assert "exitcode: -9" in out.stderr or "SIGKILL" in out.stderr  # the worker really died
    assert re.search(r"resumed from .* at step [45], \d+ batches into epoch 1/\d+", log), log  # rank 0 saved 4 or 5
    assert "finished: step 16" in log
    assert ckpt.load_checkpoint(tmp_path / ckpt.LATEST)["state"]["step"] == 16


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_skipped(tmp_path):
    make_odd_images(tmp_path)
    locked = tmp_path / "train" / "good" / "ok.jpg"
    locked.chmod(0)
    ds = build_image_folder(tmp_path, "train", build_pretrain_transform(32), max_bad_fraction=0.5)
    [ds[i] for i in range(len(ds))]
    assert str(locked) in ds.bad and "PermissionError" in ds.bad[str(locked)]
