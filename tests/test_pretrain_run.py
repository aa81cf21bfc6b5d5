"""End to end: the pretraining entry point, resume (also past a damaged checkpoint), gradient
accumulation, torchrun equivalence, the ImageNet config."""
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from star_mamba import checkpoint as ckpt
from star_mamba.cli import main
from star_mamba.checkpoint import load_checkpoint
from star_mamba.engine.config import load_config
from star_mamba.engine.metrics import read_metrics
from star_mamba.tasks.pretrain import pretrain

from .conftest import (assert_same_tensors, pretrain_config, pretrain_one_and_two_processes,
                       truncate)

tiny_config = pretrain_config


def metrics(path):
    return read_metrics(Path(path) / "metrics.jsonl")


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (16 steps) that the resume tests must reproduce."""
    out = tmp_path_factory.mktemp("two_epochs")
    assert pretrain(pretrain_config(out, "optim.epochs=2"))["step"] == 16
    return out


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
    assert load_config(str(tmp_path / "config.yaml")).model.fields["depth"] == 2  # resolved config


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, two_epochs):
    part = tiny_config(tmp_path / "part", "optim.epochs=2", "run.max_steps=5")
    assert pretrain(part)["step"] == 5  # stops mid-epoch (8 steps per epoch)
    resumed = pretrain(tiny_config(tmp_path / "part", "optim.epochs=2"))  # auto-resume
    assert resumed["step"] == 16
    a = load_checkpoint(two_epochs / "checkpoint-latest.pth")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint-latest.pth")["model"]
    assert_same_tensors(a, b, "weights")
    assert [r["step"] for r in metrics(tmp_path / "part")] == list(range(1, 17))


def test_damaged_latest_resumes_from_the_newest_numbered_checkpoint(tmp_path, two_epochs):
    """latest (step 11) cut in half: auto-resume warns, naming it and why, takes
    checkpoint-0001.pth (end of the first epoch, step 8), redoes steps 9-16 and ends where an
    uninterrupted run does; the metrics rows of the redone steps are not doubled."""
    out = tmp_path / "run"
    assert pretrain(tiny_config(out, "optim.epochs=2", "run.max_steps=11"))["step"] == 11
    latest = out / ckpt.LATEST
    truncate(latest)
    assert pretrain(tiny_config(out, "optim.epochs=2"))["step"] == 16
    log = (out / "log.txt").read_text()
    assert re.search(rf"cannot load checkpoint {re.escape(str(latest))}: RuntimeError: "
                     r".*failed finding central directory; left in place", log)
    assert re.search(r"resumed from \S+checkpoint-0001.pth at step 8, 0 batches into epoch 2/2\b", log)
    assert_same_tensors(load_checkpoint(two_epochs / ckpt.LATEST)["model"],
                        load_checkpoint(latest)["model"], "weights")
    assert [r["step"] for r in metrics(out)] == list(range(1, 17))


def test_explicit_resume_of_a_damaged_file_is_one_clear_error(tmp_path):
    pretrain(tiny_config(tmp_path, "run.max_steps=1"))
    damaged, cut = tmp_path / "copy.pth", truncate(tmp_path / ckpt.LATEST)
    damaged.write_bytes(cut)
    for path in (damaged, tmp_path / ckpt.LATEST):  # explicit, or auto with nothing else left
        resume = f"run.resume={path}" if path == damaged else "run.resume=auto"
        with pytest.raises(ValueError) as error:
            pretrain(tiny_config(tmp_path, resume))
        message = str(error.value)
        assert str(path) in message and "failed finding central directory" in message
        assert "\n" not in message and len(message.replace(str(tmp_path), "")) < 300, message
    assert [r["step"] for r in metrics(tmp_path)] == [1]  # nothing ran
    assert damaged.read_bytes() == (tmp_path / ckpt.LATEST).read_bytes() == cut  # left as found


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


def test_torchrun_two_processes_match_one(tmp_path):
    one, two = pretrain_one_and_two_processes(tmp_path)
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
    assert cfg.model.name == "star_base" and cfg.model.fields["img_size"] == 192
    summary = pretrain(cfg)
    assert summary["step"] == 2  # 8 images, batch 4 (one sequence of 4 x 160 tokens)
    rows = metrics(tmp_path / "out")
    assert len(rows) == 2 and all(0 < r["loss"] < 10 for r in rows)


def test_accum_iter_2_equals_one_batch_of_twice_the_size(tmp_path, monkeypatch):
    """One plain SGD step of lr 1 (so the step is minus the gradient; no momentum, weight decay,
    clipping, warm-up or drop path): 2 accumulated micro-batches of 4 images give the weights of
    one batch of 8, and both are the initial weights minus the gradient of the mean loss over
    those 8 images, computed here directly on a copy of the initial model."""
    import copy
    from star_mamba.data import SyntheticImages
    from star_mamba.engine import trainer
    from star_mamba.engine.sampler import BlockShardSampler
    initial = []

    def sgd(model, name, lr, **unused):
        initial.append(copy.deepcopy(model))
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)

    monkeypatch.setattr(trainer, "create_optimizer_v2", sgd)
    stepped = {}
    for accum, batch in ((1, 8), (2, 4)):
        pretrain(tiny_config(tmp_path / f"accum{accum}", "optim.lr=1.0", "optim.warmup_epochs=0",
                             "optim.clip_grad=null", "model.drop_path_rate=0", "optim.epochs=1",
                             "run.max_steps=1", f"optim.accum_iter={accum}",
                             f"optim.batch_size={batch}"))
        stepped[accum] = load_checkpoint(tmp_path / f"accum{accum}" / ckpt.LATEST)["model"]
    assert_same_tensors(initial[0].state_dict(), initial[1].state_dict(), "initial weights")
    model = initial[0].train()
    images = SyntheticImages(64, img_size=16, in_chans=1)  # the run's data and first batch
    first = BlockShardSampler(64, batch_size=8, seed=0).batch_indices(0)
    model(torch.stack([images[i][0] for i in first])).loss.backward()
    expected = {n: (p - p.grad).detach() for n, p in model.named_parameters()}
    assert max((expected[n] - p).abs().max() for n, p in model.named_parameters()) > 1e-3
    # float32 sums in another order: differences of a few 1e-6 on steps of order 0.1 (a wrong
    # accumulation, e.g. a missing 1/accum, would be off by the step itself)
    for accum in (1, 2):
        assert_same_tensors({n: stepped[accum][n] for n in expected}, expected,
                            f"accum {accum}", rtol=1e-4, atol=2e-5)
    assert_same_tensors(stepped[2], stepped[1], "accum 2 vs 1", rtol=1e-4, atol=2e-5)
