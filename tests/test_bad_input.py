"""Bad input that must end as one clear line, or be read sensibly (issue 24): image folders with
symlink loops and non-UTF-8 names, empty config files, absurd sizes, checkpoints of another
width, crafted pickles and run directories given where a checkpoint is expected."""
import io
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import star_mamba
from star_mamba import checkpoint as ckpt
from star_mamba.cli import main
from star_mamba.data import build_image_folder
from star_mamba.data.folder import collect_unreadable
from star_mamba.engine.config import load_config
from star_mamba.errors import CheckpointError, ConfigError, UnreadableImagesError

from .conftest import TINY, TINY_DECODER, finetune_overrides, tiny_classifier
from .test_cli import TINY_PRETRAIN, assert_one_error_line, sets


def save_png(path: Path) -> None:
    Image.new("RGB", (8, 8), (100, 150, 200)).save(path, format="PNG")


# ------------------------------------------------------------------------------ image folders

def test_a_directory_symlink_loop_is_read_once_and_named(tmp_path, star_log):
    for name in ("a/0.png", "a/1.png", "b/0.png"):
        (tmp_path / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        save_png(tmp_path / "train" / name)
    os.symlink(".", tmp_path / "train" / "b" / "self")  # b/self -> b: a loop
    ds = build_image_folder(tmp_path, "train")
    assert sorted(Path(p).relative_to(tmp_path / "train").as_posix() for p, _ in ds.samples) == \
        ["a/0.png", "a/1.png", "b/0.png"]
    loops = [r.getMessage() for r in star_log.records if "loop" in r.getMessage()]
    assert len(loops) == 1 and str(tmp_path / "train" / "b" / "self") in loops[0], loops


def test_a_directory_symlink_out_of_the_tree_is_followed(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    save_png(tmp_path / "elsewhere" / "0.png")
    (tmp_path / "train" / "a").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", tmp_path / "train" / "a" / "more")
    assert len(build_image_folder(tmp_path, "train")) == 1


@pytest.fixture
def strict_utf8_log():
    """The package log written to a strict UTF-8 stream only (as a log file is): the handlers
    earlier runs in this process left (on streams pytest has since closed) are set aside."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    logger = logging.getLogger("star_mamba")
    before = logger.handlers[:]
    logger.handlers[:] = [logging.StreamHandler(stream)]
    yield stream
    logger.handlers[:] = before


def test_non_utf8_file_names_are_named_safely(tmp_path, strict_utf8_log, capsys):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    save_png(folder / "good.png")
    with open(os.fsencode(folder) + b"/good\xfe.png", "wb") as f:  # a readable odd name
        f.write((folder / "good.png").read_bytes())
    with open(os.fsencode(folder) + b"/bad\xff.png", "wb") as f:  # a broken one
        f.write(b"not an image")
    ds = build_image_folder(tmp_path, "train", max_bad_fraction=1.0)
    assert len(ds) == 3
    for i in range(len(ds)):
        ds[i]
    assert "Logging error" not in capsys.readouterr().err
    strict_utf8_log.flush()
    logged = strict_utf8_log.buffer.getvalue().decode("utf-8")
    assert "bad\\xff.png" in logged, logged

    with collect_unreadable() as reports:  # as training reads it: named in the reports
        ds.bad.clear()
        for i in range(len(ds)):
            ds[i]
    assert [name.rsplit("/", 1)[-1] for _, name, _ in reports] == ["bad\\xff.png"]
    assert all(text.encode("utf-8") for report in reports for text in report[1:])

    strict = build_image_folder(tmp_path, "train", max_bad_fraction=0.0)
    with pytest.raises(UnreadableImagesError, match=r"bad\\xff\.png") as e:
        for i in range(len(strict)):
            strict[i]
    str(e.value).encode("utf-8")


# ------------------------------------------------------------------------------ configs

def test_an_empty_config_file_is_one_line(tmp_path, capsys):
    for text in ("", "# only a comment\n", "{}\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ConfigError, match="empty"):
            load_config(str(empty), task="pretrain")
        assert main(["pretrain", "-c", str(empty), "--output-dir", str(tmp_path / "run")]) == 2
        assert_one_error_line(capsys, "pretrain", str(empty), "empty")
    assert not (tmp_path / "run").exists()


def test_an_absurd_image_size_is_refused_before_anything_is_built(tmp_path, capsys):
    # load_config allocates nothing: checked here first, so that a missing check cannot
    # make this test build a 65536 px model
    with pytest.raises(ConfigError, match="model.max_tokens"):
        load_config("pretrain/fashion_mnist", ["model.img_size=65536"])
    with pytest.raises(ConfigError, match="model.max_tokens"):  # the packed sequence
        load_config("pretrain/fashion_mnist", ["model.images_per_sequence=1000"]).model \
            .star_config().validate_pretraining()
    assert main(["pretrain", "--set", "model.img_size=65536", "--output-dir", str(tmp_path)]) == 2
    line = assert_one_error_line(capsys, "pretrain", "model.img_size=65536", "model.max_tokens")
    assert str(star_mamba.config.DEFAULT_MAX_TOKENS) in line
    big = ["model.img_size=2048"]  # 512 x 512 patches of 4 px: 262144 tokens
    with pytest.raises(ConfigError, match="262144 tokens"):
        load_config("pretrain/fashion_mnist", big)
    raised = load_config("pretrain/fashion_mnist", [*big, "model.max_tokens=300000"])
    assert raised.model.star_config().max_tokens == 300000  # a configurable cap
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_bad_thread_counts_are_one_line(threads, tmp_path, capsys):
    with pytest.raises(ConfigError, match="run.threads"):
        load_config("pretrain/fashion_mnist", [f"run.threads={threads}"])
    assert main(["pretrain", "--set", f"run.threads={threads}", "--output-dir", str(tmp_path)]) == 2
    assert_one_error_line(capsys, "pretrain", f"run.threads={threads}")


# ------------------------------------------------------------------------------ checkpoints

def _pretraining_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = star_mamba.create_pretrain_model("star_tiny", **{**TINY, **TINY_DECODER, "in_chans": 3,
                                                             "img_size": 32, "patch_size": 8})
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict()}, path)
    return path


def _classifier_checkpoint(path: Path) -> Path:
    model = tiny_classifier(**{"in_chans": 3, "img_size": 32, "patch_size": 8, "num_classes": 4})
    torch.save({"model": model.state_dict(), "model_config": model.cfg.to_dict()}, path)
    return path


@pytest.mark.parametrize("make", [_pretraining_checkpoint, _classifier_checkpoint])
def test_finetune_from_a_narrower_checkpoint_is_one_line(make, shapes_8, tmp_path, capsys):
    pretrained = make(tmp_path / "narrow.pth")
    out = tmp_path / "run"
    assert main(["finetune", *sets(*finetune_overrides(shapes_8, out, "model.embed_dim=48",
                                                       f"run.pretrained={pretrained}"))]) == 2
    assert_one_error_line(capsys, "finetune", str(pretrained),
                          "model.embed_dim: checkpoint 32 vs config 48")


def test_weights_of_another_width_without_a_model_config_name_a_weight(tmp_path):
    from star_mamba.models.convert import load_pretrained
    state = torch.load(_pretraining_checkpoint(tmp_path / "p.pth"))["model"]  # no model_config
    wider = tiny_classifier(in_chans=3, img_size=32, patch_size=8, embed_dim=48)
    with pytest.raises(CheckpointError, match=r"backbone\.\S+: shape \(.*32.*\) there"):
        load_pretrained(wider, state)


class RunsCode:
    """A pickle that runs code when loaded (here a harmless print)."""

    def __reduce__(self):
        return print, ("CRAFTED PICKLE RAN",)


@pytest.fixture
def crafted(tmp_path) -> Path:
    path = tmp_path / "crafted.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": RunsCode()}, path)
    return path


def test_a_crafted_pickle_is_not_a_safe_checkpoint(crafted, tmp_path, capsys):
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(crafted)
    message = str(e.value)
    for needle in (str(crafted), "not a safe checkpoint", "weights_only", "print", "trust",
                   "safetensors"):
        assert needle in message, (needle, message)
    assert "weights_only=False" not in message
    assert main(["export", "--checkpoint", str(crafted), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert_one_error_line(capsys, "export", "not a safe checkpoint")


def test_convert_arm_refuses_a_crafted_pickle_in_one_safe_line(crafted, tmp_path, capsys):
    assert main(["convert-arm", str(crafted), "--out", str(tmp_path / "o.pth")]) == 2
    line = assert_one_error_line(capsys, "convert-arm", str(crafted), "not a safe checkpoint",
                                 "print")
    assert "weights_only=False" not in line
    assert "CRAFTED PICKLE RAN" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ run directories

@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["pretrain", *sets(*TINY_PRETRAIN, "run.max_steps=1"), "--output-dir", str(out)]) == 0
    return out


def test_resume_from_a_run_directory(pretrain_run, tmp_path, capsys):
    args = ["pretrain", *sets(*TINY_PRETRAIN, "run.max_steps=2"), "--output-dir", str(tmp_path)]
    capsys.readouterr()
    assert main([*args, "--resume", str(pretrain_run)]) == 0
    assert f"resumed from {pretrain_run / ckpt.LATEST}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args, "--resume", str(empty)]) == 2
    assert_one_error_line(capsys, "pretrain", str(empty), "is a directory", ckpt.LATEST)


def test_export_takes_a_run_directory(pretrain_run, tmp_path, capsys):
    out = tmp_path / "weights.safetensors"
    assert main(["export", "--checkpoint", str(pretrain_run), "--out", str(out)]) == 0
    assert out.is_file()
    assert ckpt.load_checkpoint(out)["model_config"]["embed_dim"] == 32
