"""Reliability: exact resume after SIGKILL, atomic saves, bad images, bad numbers, bad configs,
safe loading, and a torchrun job that survives a killed worker."""
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from star_mamba.data.folder import build_image_folder
from star_mamba.data.transforms import build_pretrain_transform
from star_mamba import checkpoint as ckpt
from star_mamba.engine.config import load_config
from star_mamba.engine.pretrain import pretrain

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.img_size=16", "model.patch_size=4", "model.in_chans=1", "model.cluster_size=2",
        "model.embed_dim=32", "model.depth=2", "model.decoder_dim=32", "model.decoder_depth=2",
        "model.decoder_heads=2", "model.images_per_sequence=2", "data.name=synthetic",
        "data.synthetic_images=64", "data.num_workers=0", "optim.batch_size=8", "optim.lr=3e-3",
        "optim.epochs=3", "run.progress=false", "run.tensorboard=false", "run.log_every=1",
        "run.threads=1", "model.drop_path_rate=0.1"]  # drop path: a random generator to restore


@pytest.fixture
def star_log(caplog):
    """caplog for the package logger, which does not propagate to the root logger."""
    logger = logging.getLogger("star_mamba")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def cli(out, *extra, env=None, **kw):
    sets = [f"--set={s}" for s in (*TINY, f"run.output_dir={out}", *extra)]
    return subprocess.Popen([sys.executable, "-m", "star_mamba", "pretrain", *sets], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def final_weights(out):
    return ckpt.load_checkpoint(Path(out) / ckpt.LATEST)["model"]


def test_sigkill_at_a_random_step_then_resume_gives_identical_weights(tmp_path):
    assert cli(tmp_path / "full").wait(timeout=300) == 0
    kill_after = int(np.random.default_rng().integers(2, 12))  # of 24 steps: leave a margin
    proc = cli(tmp_path / "killed", "run.save_every_steps=1")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = ckpt.load_checkpoint(tmp_path / "killed" / ckpt.LATEST)
    assert 0 < saved["state"]["step"] < 24, saved["state"]  # really stopped mid-run
    assert cli(tmp_path / "killed").wait(timeout=300) == 0  # resumes automatically
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    assert ckpt.load_checkpoint(tmp_path / "killed" / ckpt.LATEST)["state"]["step"] == 24
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on CPU


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
    data = (d / "good" / "truncated.jpg").read_bytes()
    (d / "good" / "truncated.jpg").write_bytes(data[: len(data) // 2])
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
    for k, v in saved["model"].items():
        assert torch.equal(back["model"][k], v)
    import star_mamba
    from star_mamba.models.convert import load_pretrained
    clf = star_mamba.create_model("star_tiny", img_size=16, patch_size=4, in_chans=1, embed_dim=32,
                                  depth=2, num_classes=3)
    report = load_pretrained(clf, out)
    assert "backbone.patch_embed.proj.weight" in report.loaded


def test_torchrun_job_survives_a_killed_worker(tmp_path):
    """torchrun --max-restarts: a worker SIGKILLed after step 5 -> the job restarts, resumes
    from the latest checkpoint and finishes."""
    sets = [f"--set={s}" for s in (*TINY, "optim.batch_size=4", "optim.epochs=2",
                                   "run.save_every_steps=1", f"run.output_dir={tmp_path}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", "-m", "star_mamba", "pretrain", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STAR_MAMBA_KILL_AT_STEP": "5"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    log = (tmp_path / "log.txt").read_text()
    assert "exitcode: -9" in out.stderr or "SIGKILL" in out.stderr  # the worker really died
    assert re.search(r"resumed from .* at epoch 0, step [45]\b", log), log  # rank 0 saved 4 or 5
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
