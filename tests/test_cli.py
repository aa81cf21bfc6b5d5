"""The command line: one error boundary (one line on stderr, exit code 2, --debug for the
traceback), and eval on the data of the run that made the checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from star_mamba import checkpoint as ckpt
from star_mamba.cli import COMMANDS, main
from star_mamba.errors import ConfigError

from .conftest import requires_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent

TINY_PRETRAIN = ["model.img_size=16", "model.patch_size=4", "model.in_chans=1",
                 "model.cluster_size=2", "model.embed_dim=32", "model.depth=2",
                 "model.decoder_dim=32", "model.decoder_depth=2", "model.decoder_heads=2",
                 "model.images_per_sequence=2", "data.name=synthetic", "data.synthetic_images=16",
                 "data.num_workers=0", "optim.batch_size=8", "run.progress=false",
                 "run.tensorboard=false", "run.threads=1"]


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def make_classes(root, n_classes, train=4, val=2, size=32):
    """An ImageFolder tree (train/ and val/, no test/) of ``n_classes`` flat-coloured classes."""
    gen = torch.Generator().manual_seed(n_classes)
    for split, n in (("train", train), ("val", val)):
        for c in range(n_classes):
            (root / split / f"class{c}").mkdir(parents=True)
            base = torch.tensor([(c * 97) % 256, (c * 53 + 80) % 256, (c * 29 + 160) % 256])
            for i in range(n):
                noise = torch.randint(-20, 21, (size, size, 3), generator=gen)
                pixels = (base + noise).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    return root


def finetune_sets(root, out):
    """An 8-class ImageFolder run from the built-in Fashion-MNIST fine-tuning config: only the
    data changes (no num_classes, no eval_split: both follow the data)."""
    return sets("data.name=imagefolder", f"data.root={root}", "data.crop_pct=1.0",
                "model.img_size=32", "model.patch_size=8", "model.in_chans=3",
                "model.embed_dim=32", "model.depth=2", "model.directions=2",
                "optim.batch_size=8", "optim.epochs=2", "optim.lr=3e-3", "run.pretrained=null",
                "run.progress=false", "run.tensorboard=false", "run.threads=1",
                f"run.output_dir={out}")


def assert_one_error_line(capsys, command, *needles):
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"star-mamba {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def test_commands_are_one_table():
    assert list(COMMANDS) == ["pretrain", "finetune", "segment", "detect", "linprobe", "eval",
                              "export", "ablate", "viz", "convert-arm", "prepare-data", "models",
                              "bench"]
    for name, (text, add_arguments, handler) in COMMANDS.items():
        assert text and callable(add_arguments) and callable(handler), name


@pytest.mark.parametrize("argv,needles", [
    (["pretrain", *sets("model.drop_path_rat=0.1")], ["model.drop_path_rat", "did you mean 'drop_path_rate'"]),
    (["pretrain", *sets("model.drop_path_rate=abc")], ["model.drop_path_rate='abc'", "expected a number"]),
    (["pretrain", *sets("model.img_size=18")], ["model.img_size=18", "patch_size"]),
    (["pretrain", *sets("model.name=star_bse")], ["did you mean 'star_base'"]),
    (["pretrain", *sets("optim.blr")], ["section.key=value"]),
    (["pretrain", *sets("optm.blr=1")], ["did you mean 'optim'"]),
    (["pretrain", "-c", "pretrain/nope"], ["'pretrain/nope'", "built-in"]),
    (["finetune", "-c", "pretrain/fashion_mnist"], ["task 'pretrain', not 'finetune'"]),
    (["pretrain", *sets("data.name=imagefolder", "model.in_chans=3", "data.root=/nowhere/data")],
     ["/nowhere/data"]),
    (["finetune", *sets("data.name=imagefolder")], ["data.root is required"]),
    (["pretrain", *sets("data.name=shards", "model.in_chans=3", "data.root=/nowhere/shards")],
     ["data.root=/nowhere/shards does not exist", "prepare-data"]),
    (["finetune", *sets("data.name=hf", "model.in_chans=3", "data.root=/nowhere/hf")],
     ["data.root=/nowhere/hf does not exist"]),
    (["prepare-data", "/nowhere/src", "/nowhere/out"], ["SRC /nowhere/src is not a directory"]),
    (["prepare-data", "/nowhere/src", "/nowhere/out", "--shard-size", "big"], ["--shard-size"]),
    (["eval", "--checkpoint", "/nowhere/checkpoint-best.pth"], ["/nowhere/checkpoint-best.pth"]),
    (["export", "--checkpoint", "/nowhere/c.pth", "--out", "/nowhere/c.safetensors"], ["/nowhere/c.pth"]),
    (["convert-arm", "/nowhere/arm.pth", "--out", "/nowhere/o.pth", "--set", "global_pool=cls"],
     ["section.key=value"]),
    (["convert-arm", "/nowhere/arm.pth", "--out", "/nowhere/o.pth", "--set", "run.x=1"],
     ["model fields only"]),
    (["viz", "--checkpoint", "/nowhere/p.pth", "--set", "model.depth=x"], ["model.depth='x'"]),
])
def test_user_errors_are_one_line_and_exit_2(argv, needles, capsys, tmp_path):
    assert main([*argv, "--output-dir", str(tmp_path)] if argv[0] in ("pretrain", "finetune")
                else argv) == 2
    assert_one_error_line(capsys, argv[0], *needles)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_yaml_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: [1, 2\n")
    assert main(["pretrain", "-c", str(bad)]) == 2
    assert_one_error_line(capsys, "pretrain", str(bad), "not valid YAML")
    bad.write_text("- a list\n")
    assert main(["pretrain", "-c", str(bad)]) == 2
    assert_one_error_line(capsys, "pretrain", "mapping of sections")


def test_debug_shows_the_traceback_and_bugs_are_not_swallowed(monkeypatch, capsys):
    argv = ["pretrain", "--set", "model.drop_path_rat=0.1"]
    with pytest.raises(ConfigError, match="did you mean 'drop_path_rate'"):
        main(["--debug", *argv])
    with pytest.raises(ConfigError):
        main([*argv, "--debug"])  # after the command too

    def bug(cfg):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr("star_mamba.tasks.pretrain.pretrain", bug)
    with pytest.raises(KeyError):
        main(["pretrain"])
    assert capsys.readouterr().err == ""


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "star_mamba", *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_subprocess_prints_one_line_and_nothing_else():
    r = _run("pretrain", "--set", "model.drop_path_rate=1e-1", "--set", "model.clustr_size=2")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "star-mamba pretrain: error: unknown config key model.clustr_size; did you mean "
        "'cluster_size'?"]


def test_an_internal_value_error_shows_its_traceback_and_exits_1(tmp_path):
    """A ValueError from inside the model is a bug, not the user's mistake: not one line."""
    code = ("import sys\n"
            "from star_mamba.models.pretrain import StarPretrain\n"
            "def forward(self, images):\n"
            "    raise ValueError('batch of 8 images against 4 targets inside the loss')\n"
            "StarPretrain.forward = forward\n"
            "from star_mamba.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "pretrain",
                        *sets(*TINY_PRETRAIN, "run.max_steps=1"), "--output-dir", str(tmp_path)],
                       cwd=ROOT, text=True, capture_output=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.rstrip().endswith(
        "ValueError: batch of 8 images against 4 targets inside the loss")
    assert "star-mamba pretrain: error:" not in r.stderr


def test_set_model_float_in_exponent_form_trains(tmp_path, capsys):
    assert main(["pretrain", *sets(*TINY_PRETRAIN, "model.drop_path_rate=1e-1", "run.max_steps=1"),
                 "--output-dir", str(tmp_path)]) == 0
    assert ckpt.load_checkpoint(tmp_path / ckpt.LATEST)["model_config"]["drop_path_rate"] == 0.1


def test_resume_of_another_model_is_one_line(tmp_path, capsys):
    args = ["pretrain", *sets(*TINY_PRETRAIN, "run.max_steps=1"), "--output-dir", str(tmp_path)]
    assert main(args) == 0
    assert main([*args, "--set", "model.scan_backend=torch"]) == 0  # runtime only: resumes
    capsys.readouterr()
    assert main([*args, "--set", "model.embed_dim=64"]) == 2
    assert_one_error_line(capsys, "pretrain", "model.embed_dim: checkpoint 32 vs config 64",
                          "run.resume=never")


@pytest.fixture(scope="module")
def eight_class_run(tmp_path_factory):
    """A classifier fine-tuned on an 8-class ImageFolder (train/ and val/, no test/)."""
    tmp = tmp_path_factory.mktemp("eight")
    root, out = make_classes(tmp / "eight", 8), tmp / "ft"
    assert main(["finetune", *finetune_sets(root, out)]) == 0
    return root, out


def test_eval_uses_the_checkpoint_run_config(eight_class_run, tmp_path, capsys):
    """The issue: `star-mamba eval --checkpoint` with nothing else evaluates on the folder the
    classifier was fine-tuned on, its val/ split (an ImageFolder's default eval split), and
    reproduces the logged top-1."""
    root, out = eight_class_run
    saved = ckpt.load_checkpoint(out / ckpt.BEST)
    assert saved["model_config"]["num_classes"] == 8  # followed the dataset
    assert saved["run_config"]["data"]["eval_split"] is None
    best = saved["best"]
    logged = [json.loads(x) for x in open(out / "metrics.jsonl") if '"top1"' in x]
    top1 = next(r["top1"] for r in logged if r["epoch"] == best["epoch"])
    config_before = (out / "config.yaml").read_text()
    capsys.readouterr()

    assert main(["eval", "--checkpoint", str(out / ckpt.BEST)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["top1"] == pytest.approx(top1) and captured.err == ""
    assert "on 16 images" in captured.out  # the val split: 8 classes x 2
    assert (out / "config.yaml").read_text() == config_before  # eval writes nothing

    # --set changes the saved config: another folder with 3 classes is a clear error
    three = make_classes(tmp_path / "three", 3)
    assert main(["eval", "--checkpoint", str(out / ckpt.BEST), "--set", f"data.root={three}"]) == 2
    assert_one_error_line(capsys, "eval", "8-class classifier", str(three), "3 classes")
    # --ema on a run without EMA
    assert main(["eval", "--checkpoint", str(out / ckpt.BEST), "--ema"]) == 2
    assert_one_error_line(capsys, "eval", "no EMA weights")
    # fine-tuning with a num_classes that is not the dataset's
    assert main(["finetune", *finetune_sets(root, tmp_path / "ft2"), "--set",
                 "model.num_classes=10"]) == 2
    assert_one_error_line(capsys, "finetune", "model.num_classes=10", "8 classes")


@requires_fashion_mnist
def test_eval_with_another_config_is_a_clear_class_count_error(eight_class_run, capsys):
    """What the issue hit: the 8-class checkpoint evaluated with the Fashion-MNIST config."""
    _, out = eight_class_run
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / ckpt.BEST), "-c", "finetune/fashion_mnist"]) == 2
    assert_one_error_line(capsys, "eval", "8-class classifier", "data.name=fashion_mnist",
                          "split 'test'", "10 classes")
