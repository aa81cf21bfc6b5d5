"""End to end: the pretraining entry point, resume, torchrun equivalence, the ImageNet config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from star_mamba.cli import main
from star_mamba.checkpoint import load_checkpoint
from star_mamba.engine.config import load_config
from star_mamba.engine.pretrain import pretrain

TINY_MODEL = ["model.img_size=16", "model.patch_size=4", "model.in_chans=1",
              "model.cluster_size=2", "model.embed_dim=32", "model.depth=2",
              "model.decoder_dim=32", "model.decoder_depth=2", "model.decoder_heads=2",
              "model.images_per_sequence=2"]


def tiny_config(tmp_path, *extra):
    return load_config("pretrain/fashion_mnist", [
        *TINY_MODEL, "data.name=synthetic", "data.synthetic_images=64", "data.num_workers=0",
        "optim.batch_size=8", "optim.blr=2e-2", "optim.warmup_epochs=0.5", "optim.epochs=3",
        "run.progress=false", "run.tensorboard=false", "run.log_every=1",
        f"run.output_dir={tmp_path}", "run.threads=1", *extra])


def metrics(path):
    return [json.loads(line) for line in open(Path(path) / "metrics.jsonl")]


def test_pretrain_writes_outputs_and_loss_falls(tmp_path):
    summary = pretrain(tiny_config(tmp_path, "optim.epochs=6", "optim.lr=3e-3",
                                   "optim.warmup_epochs=1", "run.save_every=5"))
    assert summary["step"] == 6 * 8 and summary["epoch"] == 6
    for name in ("config.yaml", "metrics.jsonl", "log.txt", "loss_curve.png",
                 "checkpoint-latest.pth", "checkpoint-0005.pth", "checkpoint-0006.pth"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "checkpoint-0001.pth").exists()
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 49))
    first, last = sum(r["loss"] for r in rows[:6]) / 6, sum(r["loss"] for r in rows[-6:]) / 6
    assert last < 0.95 * first, (first, last)
    saved = load_checkpoint(tmp_path / "checkpoint-latest.pth")
    assert saved["state"]["step"] == 48 and saved["model_config"]["embed_dim"] == 32
    assert load_config(str(tmp_path / "config.yaml")).model["depth"] == 2  # resolved config


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    full = pretrain(tiny_config(tmp_path / "full", "optim.epochs=2"))
    part = tiny_config(tmp_path / "part", "optim.epochs=2", "run.max_steps=5")
    assert pretrain(part)["step"] == 5  # stops mid-epoch (8 steps per epoch)
    resumed = pretrain(tiny_config(tmp_path / "part", "optim.epochs=2"))  # auto-resume
    assert full["step"] == resumed["step"] == 16
    a = load_checkpoint(tmp_path / "full" / "checkpoint-latest.pth")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint-latest.pth")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in metrics(tmp_path / "part")] == list(range(1, 17))


def test_resume_refuses_another_model(tmp_path):
    pretrain(tiny_config(tmp_path, "run.max_steps=1"))
    with pytest.raises(ValueError, match="model.depth: checkpoint 2 vs config 3"):
        pretrain(tiny_config(tmp_path, "model.depth=3"))


def test_cli_reports_bad_config_before_training(tmp_path, capsys):
    code = main(["pretrain", "--set", "optim.batch_size=6", "--set", "data.name=synthetic",
                 "--output-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "optim.batch_size=6" in err and "model.images_per_sequence=4" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_reports_missing_fashion_mnist(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["pretrain", "--set", f"data.root={empty}", "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def _final_losses(out_dir):
    return [r["loss"] for r in metrics(out_dir)]


def test_torchrun_two_processes_match_one(tmp_path):
    common = [*TINY_MODEL, "data.name=synthetic", "data.synthetic_images=64",
              "data.num_workers=0", "optim.epochs=1", "optim.blr=1e-2", "run.progress=false",
              "run.tensorboard=false", "run.log_every=1", "run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(nproc, batch, out):
        sets = [f"--set={s}" for s in (*common, f"optim.batch_size={batch}", f"run.output_dir={out}")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "star_mamba", "pretrain", *sets]
        subprocess.run(cmd, check=True, env=env, timeout=300, capture_output=True)

    run(1, 16, tmp_path / "one")
    run(2, 8, tmp_path / "two")
    one, two = _final_losses(tmp_path / "one"), _final_losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)


def test_star_base_in1k_config_runs_two_steps_on_jpegs(tmp_path):
    root = tmp_path / "imagenet"
    gen = torch.Generator().manual_seed(0)
    for cls in ("n01", "n02"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(3, 60 + 10 * i, 80, generator=gen) * 255).byte()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(root / "train" / cls / f"{i}.JPEG")
    cfg = load_config("pretrain/star_base_in1k", [
        f"data.root={root}", "data.num_workers=0", "optim.batch_size=4", "run.max_steps=2",
        "run.amp=off", f"run.output_dir={tmp_path / 'out'}", "run.progress=false",
        "run.tensorboard=false", "run.log_every=1"])
    assert cfg.model["name"] == "star_base" and cfg.model["img_size"] == 192
    summary = pretrain(cfg)
    assert summary["step"] == 2  # 8 images, batch 4 (one sequence of 4 x 160 tokens)
    rows = metrics(tmp_path / "out")
    assert len(rows) == 2 and all(0 < r["loss"] < 10 for r in rows)
