"""What a new user meets: a quick --help with a help text for every option, the head's lr in
the log, progress in evaluation, linprobe's result printed once, checkpoints written once per
save with the usual permissions, exported weights that keep their data config, 1-based epochs
in the log, viz and export taking what eval and viz take, bench writing outside the tracked
tree, and a finished run saying so when run again."""
import argparse
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from star_mamba import checkpoint as ckpt
from star_mamba.cli import ABLATE_DEFAULTS, PREPARE_DEFAULTS, build_parser, main
from star_mamba.engine.config import load_config
from star_mamba.engine.lr_sched import lr_at
from star_mamba.engine.metrics import read_metrics
from star_mamba.evaluation.classification import evaluate

from .conftest import make_noise_images, tiny_classifier

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"

QUIET = ["run.progress=false", "run.tensorboard=false", "run.threads=1"]
TINY_PRETRAIN = ["model.img_size=16", "model.patch_size=4", "model.in_chans=3",
                 "model.cluster_size=2", "model.embed_dim=32", "model.depth=2",
                 "model.decoder_dim=32", "model.decoder_depth=2", "model.decoder_heads=2",
                 "model.images_per_sequence=2", "data.name=synthetic", "data.synthetic_images=16",
                 "data.num_workers=0", "optim.batch_size=8", "optim.epochs=1", *QUIET]
# A 16 px classifier on 32 noise images of 4 classes, with layer decay: 2 epochs of 4 steps.
TINY_FINETUNE = ["model.img_size=16", "model.patch_size=4", "model.in_chans=3",
                 "model.embed_dim=32", "model.depth=2", "model.directions=2",
                 "data.name=imagefolder", "data.crop_pct=1.0",
                 "data.num_workers=0", "optim.batch_size=8", "optim.epochs=2", "optim.lr=1e-3",
                 "optim.warmup_epochs=0.5", "optim.layer_decay=0.75", "run.log_every=1", *QUIET]


def sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A one-epoch 16 px synthetic pretraining run (its directory)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(["pretrain", "--output-dir", str(out), *sets(TINY_PRETRAIN)]) == 0
    return out


@pytest.fixture(scope="module")
def noise16(tmp_path_factory) -> Path:
    """An ImageFolder of 16 px noise: 4 classes, 32 train and 16 val images."""
    root = tmp_path_factory.mktemp("noise16")
    make_noise_images(root, per_class=8, size=16)
    return root


@pytest.fixture(scope="module")
def finetuned(pretrained, noise16, tmp_path_factory) -> Path:
    """A two-epoch fine-tune of it, started with finetune --pretrained."""
    out = tmp_path_factory.mktemp("finetune") / "run"
    assert main(["finetune", "--pretrained", str(pretrained / ckpt.LATEST), "--output-dir",
                 str(out), *sets([*TINY_FINETUNE, f"data.root={noise16}"])]) == 0
    return out


# ------------------------------------------------------------------ 1. the parser

def test_help_and_the_parser_import_neither_torch_nor_timm():
    code = ("import contextlib, io, sys\n"
            "from star_mamba.cli import COMMANDS, build_parser\n"
            "parser = build_parser()\n"
            "for argv in [['--help']] + [[name, '--help'] for name in COMMANDS]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as text:\n"
            "        try:\n"
            "            parser.parse_args(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    assert 'usage: star-mamba' in text.getvalue(), argv\n"
            "print(sorted(m for m in ('torch', 'timm', 'numpy', 'PIL') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_import_star_mamba_still_registers_the_timm_names():
    code = ("import star_mamba, timm\n"
            "m = star_mamba.create_model('star_tiny', depth=1, img_size=32)\n"
            "print(len(timm.list_models('star_*')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 5


def subcommands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


def test_the_description_is_plain_text():
    text = build_parser().format_help()
    assert "star-mamba pretrain" in text
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_every_option_of_every_command_has_a_help_text():
    parser = build_parser()
    from star_mamba.cli import COMMANDS
    commands = {"star-mamba": parser, **subcommands(parser)}
    assert len(commands) == 1 + len(COMMANDS)
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, sub in commands.items() for a in sub._actions
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert missing == []


def test_the_parser_defaults_are_the_libraries():
    from star_mamba.data.prepare import PrepareOptions
    from star_mamba.tools.ablate import Budget
    assert ABLATE_DEFAULTS == {k: getattr(Budget, k) for k in ABLATE_DEFAULTS}
    assert PREPARE_DEFAULTS == {k: getattr(PrepareOptions, k) for k in PREPARE_DEFAULTS}


# ------------------------------------------------------------------ 2, 8, 9, 10. fine-tuning

def test_finetune_pretrained_shortcut_sets_run_pretrained(pretrained, finetuned):
    log = (finetuned / "log.txt").read_text()
    assert f"loaded {pretrained / ckpt.LATEST}" in log
    saved = ckpt.load_checkpoint(finetuned / ckpt.LATEST)
    assert saved["run_config"]["run"]["pretrained"] == str(pretrained / ckpt.LATEST)


def test_logged_lr_is_the_heads_the_schedules_own(finetuned):
    cfg = load_config(None, task="finetune",
                      base=ckpt.load_checkpoint(finetuned / ckpt.LATEST)["run_config"])
    o = cfg.optim
    rows = [r for r in read_metrics(finetuned / "metrics.jsonl") if "lr" in r]
    steps_per_epoch = 4  # 32 images, batch 8
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:  # the lr set at the first micro-batch of the step's window, times 1
        expected = lr_at((r["step"] - 1) / steps_per_epoch, o.lr, o.min_lr, o.warmup_epochs,
                         o.epochs)
        assert r["lr"] == pytest.approx(expected, rel=1e-9), r
    # (the deepest-decayed group runs at 0.75 ** 3 of it: what was logged before)


def test_finetune_loss_curve_names_cross_entropy(pretrained, finetuned):
    fine = Image.open(finetuned / "loss_curve.png").text
    pre = Image.open(pretrained / "loss_curve.png").text
    assert "cross-entropy" in fine["Description"] and "MSE" not in fine["Description"]
    assert "MSE on per-patch-normalised pixels" in pre["Description"]


def test_epochs_in_the_log_are_one_based(finetuned):
    log = (finetuned / "log.txt").read_text()
    for line in ("epoch 1/2 done: mean loss", "epoch 1/2 eval: ", "epoch 2/2 done: mean loss",
                 "epoch 2/2 eval: "):
        assert line in log, line
    assert not re.search(r"epoch 0\b", log) and "epoch 3/2" not in log
    rows = read_metrics(finetuned / "metrics.jsonl")
    # metrics.jsonl as before: a training row's 0-based epoch, an eval row's epochs done
    assert sorted({r["epoch"] for r in rows if "lr" in r}) == [0, 1]
    assert [r["epoch"] for r in rows if "top1" in r] == [1, 2]


# ------------------------------------------------------------------ 3. evaluation progress

def test_evaluation_shows_a_progress_bar_when_asked(capsys):
    model = tiny_classifier()
    batches = [(torch.randn(4, 1, 16, 16), torch.randint(0, 3, (4,))) for _ in range(3)]
    quiet = evaluate(model, batches, torch.device("cpu"))
    assert capsys.readouterr().out == ""
    shown = evaluate(model, batches, torch.device("cpu"), progress=True, desc="eval test")
    out = capsys.readouterr().out
    assert "eval test" in out and "/3 " in out  # a bar over the 3 batches
    assert shown == quiet


# ------------------------------------------------------------------ 4. linprobe prints once

def test_linprobe_prints_its_result_once(noise16, tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["linprobe", "--pretrained", "null", "--output-dir", str(out), *sets([
        "model.img_size=16", "model.patch_size=4", "model.in_chans=3", "model.embed_dim=16",
        "model.depth=1", "data.name=imagefolder", f"data.root={noise16}", "data.crop_pct=1.0",
        "data.num_workers=0", "probe.weight_decays=[1e-2]",
        "probe.knn_k=5", *QUIET])]) == 0
    printed = capsys.readouterr().out
    assert printed.count("linear probe top-1") == 1, printed
    assert printed.count(f"wrote {out / 'linprobe.json'}") == 1, printed


# ------------------------------------------------------------------ 5, 6. checkpoint files

def payload(value: float) -> dict:
    return dict(model={"w": torch.full((16,), value)}, optimizer={}, state={"step": 1},
                model_config={})


def test_one_save_under_several_names_writes_one_file(tmp_path):
    ckpt.atomic_save(payload(1.0), tmp_path / ckpt.LATEST,
                     also=[tmp_path / "checkpoint-0001.pth", tmp_path / ckpt.BEST])
    names = [ckpt.LATEST, "checkpoint-0001.pth", ckpt.BEST]
    inodes = {os.stat(tmp_path / n).st_ino for n in names}
    assert len(inodes) == 1 and os.stat(tmp_path / ckpt.LATEST).st_nlink == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no *.tmp left
    for n in names:
        assert torch.equal(ckpt.load_checkpoint(tmp_path / n)["model"]["w"], torch.ones(16))


def test_a_later_save_of_latest_leaves_the_linked_best_as_it_was(tmp_path):
    from star_mamba.engine.checkpointer import Checkpointer
    saver = Checkpointer(tmp_path, keep_last=2)
    saver.save(payload(1.0), [ckpt.LATEST, ckpt.BEST])
    saver.save(payload(2.0), [ckpt.LATEST])
    assert torch.equal(ckpt.load_checkpoint(tmp_path / ckpt.LATEST)["model"]["w"],
                       torch.full((16,), 2.0))
    assert torch.equal(ckpt.load_checkpoint(tmp_path / ckpt.BEST)["model"]["w"], torch.ones(16))
    assert os.stat(tmp_path / ckpt.BEST).st_nlink == 1


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt.atomic_save(payload(1.0), tmp_path / ckpt.LATEST, also=[tmp_path / ckpt.BEST])
    finally:
        os.umask(old)
    for name in (ckpt.LATEST, ckpt.BEST):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# ------------------------------------------------------------------ 7, 12. export and eval

def test_export_takes_a_run_directory_and_keeps_the_run_config(finetuned, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert main(["export", "--checkpoint", str(finetuned), "--out", str(out)]) == 0
    saved = ckpt.load_checkpoint(out)
    run_config = ckpt.load_checkpoint(finetuned / ckpt.LATEST)["run_config"]
    assert saved["run_config"] == run_config
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out)]) == 0
    from_export = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main(["eval", "--checkpoint", str(finetuned / ckpt.LATEST)]) == 0
    from_pth = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert from_export == pytest.approx(from_pth)  # the same 16 val images


def test_eval_of_weights_without_a_run_config_says_which_data_it_uses(finetuned, noise16,
                                                                       tmp_path, capsys):
    from safetensors.torch import save_file
    saved = ckpt.load_checkpoint(finetuned / ckpt.LATEST)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in saved["model"].items()}, str(bare),
              metadata={"format": "star-mamba", "model_config": json.dumps(saved["model_config"])})
    data = ["data.name=imagefolder", f"data.root={noise16}", "data.crop_pct=1.0",
            "data.num_workers=0", *QUIET]
    assert main(["eval", "--checkpoint", str(bare), *sets(data)]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "holds no run config" in line]
    assert len(notes) == 1 and "finetune/fashion_mnist" in notes[0], printed


# ------------------------------------------------------------------ 11. viz

def test_viz_takes_its_data_from_the_checkpoint(pretrained, tmp_path, capsys):
    out = tmp_path / "viz"
    assert main(["viz", "--checkpoint", str(pretrained), "--out", str(out), "--no-diagnostics",
                 "--num-sequences", "1", "--max-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "from synthetic" in printed, printed
    assert (out / "predictions.png").is_file() and (out / "loss_per_position.json").is_file()


# ------------------------------------------------------------------ 13. bench

def test_bench_writes_under_runs_bench_by_default(tmp_path):
    done = subprocess.run([sys.executable, "-m", "star_mamba", "bench", "--gpu", "--dry-run",
                           "--sections", "device"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "runs" / "bench" / "gpu" / "gpu_acceptance.json").is_file()
    assert not (tmp_path / "benchmarks").exists()
    assert "runs/bench/gpu/gpu_acceptance.json" in done.stdout


# ------------------------------------------------------------------ 14. a finished run again

def test_a_finished_run_run_again_says_so(pretrained, tmp_path, capsys):
    import shutil
    pretrained = Path(shutil.copytree(pretrained, tmp_path / "run"))  # the fixture's untouched
    before = {p.name: p.read_bytes() for p in pretrained.glob("*.pth")}
    (pretrained / "loss_curve.png").unlink()
    capsys.readouterr()
    assert main(["pretrain", "--output-dir", str(pretrained), *sets(TINY_PRETRAIN)]) == 0
    printed = capsys.readouterr().out
    assert (f"{pretrained} already finished at step 2 (optim.epochs=1): nothing to train; "
            "raise optim.epochs / run.max_steps to go on, or pick another run.output_dir"
            in printed), printed
    assert "finished: step" not in printed
    assert not (pretrained / "loss_curve.png").exists()  # not plotted again
    assert {p.name: p.read_bytes() for p in pretrained.glob("*.pth")} == before
