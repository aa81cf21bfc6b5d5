"""Pretraining with ``data.sequence`` (data/build.py, the Trainer): every kind runs and saves,
``random`` stays the image-level path (and the sequence path reproduces it exactly), config
mistakes are one clear line, a resumed run is exact, and 2 processes match 1."""

import pytest
from torch.utils.data import Subset

from star_mamba import checkpoint as ckpt
from star_mamba.checkpoint import load_checkpoint
from star_mamba.cli import main
from star_mamba.data import SEQUENCE_KINDS, SequenceDataset, SyntheticImages
from star_mamba.data.moving import MovingFashionClips
from star_mamba.data.sequences import RandomSequences
from star_mamba.tasks import pretrain as pretrain_module
from star_mamba.engine.config import load_config
from star_mamba.data.build import pretraining_set as build_pretrain_dataset
from star_mamba.tasks.pretrain import pretrain
from star_mamba.errors import ConfigError

from .conftest import (assert_same_tensors, folder_pretrain_overrides, logged_losses,
                       pretrain_config, pretrain_one_and_two_processes, requires_fashion_mnist)

KINDS = [kind for kind in SEQUENCE_KINDS if kind != "random"]


def dataset_of(cfg):
    return build_pretrain_dataset(cfg.data, cfg.model.star_config(), cfg.run.seed)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_pretrains_two_steps_and_saves(tmp_path, kind):
    """64 synthetic images, K = 2, 8 images (4 sequences) per step."""
    cfg = pretrain_config(tmp_path, f"data.sequence={kind}", "run.max_steps=2")
    dataset = dataset_of(cfg)
    assert isinstance(dataset, SequenceDataset) and dataset.kind == kind and len(dataset) == 32
    assert pretrain(cfg)["step"] == 2
    saved = load_checkpoint(tmp_path / ckpt.LATEST)
    assert saved["state"]["step"] == 2 and saved["run_config"]["data"]["sequence"] == kind
    assert len(logged_losses(tmp_path)) == 2 and all(0 < x < 10 for x in logged_losses(tmp_path))
    log = (tmp_path / "log.txt").read_text()
    assert f"64 images (32 {kind} sequences of 2)" in log and "8 steps/epoch" in log


@requires_fashion_mnist
def test_clip_on_fashion_mnist_runs(tmp_path):
    """Clips read Fashion-MNIST's raw 28x28 items, so any model img_size works (16 here)."""
    cfg = pretrain_config(tmp_path, "data.name=fashion_mnist", "data.max_images=64",
                          "data.sequence=clip", "run.max_steps=2")
    dataset = dataset_of(cfg)
    assert isinstance(dataset, MovingFashionClips) and len(dataset) == 32
    assert dataset.clip(0)["sprites"][0].shape == (28, 28)
    assert dataset[0][0].shape == (2, 1, 16, 16)
    assert pretrain(cfg)["step"] == 2 and (tmp_path / ckpt.LATEST).is_file()


def test_options_reach_the_dataset(tmp_path):
    views = dataset_of(pretrain_config(tmp_path, "data.sequence=views", "data.num_sequences=10",
                                       "data.view_scale=[0.5, 0.9]", "data.view_ratio=[1, 1]",
                                       "data.view_flip=0"))
    assert (len(views), views.scale, views.ratio, views.flip_prob) == (10, (0.5, 0.9), (1.0, 1.0), 0.0)
    clip = dataset_of(pretrain_config(tmp_path, "data.sequence=clip", "data.clip_canvas=40",
                                      "data.clip_items=[2, 2]", "data.clip_speed=[1, 2]",
                                      "data.clip_per_epoch=true"))
    assert (clip.canvas_size, clip.num_items, clip.speed, clip.per_epoch) == (40, (2, 2), (1.0, 2.0), True)
    defaults = dataset_of(pretrain_config(tmp_path, "data.sequence=clip"))
    assert (defaults.canvas_size, defaults.num_items, defaults.per_epoch) == (64, (1, 2), False)
    same = dataset_of(pretrain_config(tmp_path, "data.sequence=same_class", "data.num_sequences=5"))
    assert len(same) == 5


def test_views_on_an_image_folder_crop_the_whole_image(tmp_path, shapes_8):
    """ARM's RandomResizedCrop is not applied before the views: each is cut from the whole
    32 px image and resized to the model's 16 px."""
    cfg = load_config("pretrain/fashion_mnist",
                      folder_pretrain_overrides(shapes_8, tmp_path, "data.sequence=views"))
    dataset = dataset_of(cfg)
    assert dataset.base[0][0].shape == (3, 32, 32)
    frames, labels = dataset[(0, 1)]
    assert frames.shape == (2, 3, 16, 16) and (labels == labels[0]).all()


def test_random_is_the_image_level_path(tmp_path):
    for extra in ((), ("data.sequence=random",)):
        cfg = pretrain_config(tmp_path, *extra)
        assert cfg.data.sequence == "random"
        dataset = dataset_of(cfg)  # images, not sequences (data.max_images: a Subset of them)
        assert not isinstance(dataset, SequenceDataset) and len(dataset) == 64
        assert isinstance(dataset, Subset) and type(dataset.dataset) is SyntheticImages


def test_sequence_loader_reproduces_the_image_level_run(tmp_path, monkeypatch):
    """The trainer's sequence path (sequence sampler, ReportedSequences, collate, batch // K
    sequences per step) fed RandomSequences gives bit-identical losses to today's image path,
    over an epoch boundary (8 steps per epoch)."""
    pretrain(pretrain_config(tmp_path / "images", "run.max_steps=10"))
    build = pretrain_module.pretraining_set

    def as_sequences(data, model, seed):
        return RandomSequences(build(data, model, seed), model.images_per_sequence, seed,
                               model.img_size, model.in_chans)

    monkeypatch.setattr(pretrain_module, "pretraining_set", as_sequences)
    pretrain(pretrain_config(tmp_path / "sequences", "run.max_steps=10"))
    assert "(32 random sequences of 2)" in (tmp_path / "sequences" / "log.txt").read_text()
    assert len(logged_losses(tmp_path / "images")) == 10
    assert logged_losses(tmp_path / "sequences") == logged_losses(tmp_path / "images")


def test_unknown_kind_is_one_line_with_a_hint(tmp_path, capsys):
    assert main(["pretrain", "--set", "data.sequence=same_clas", "--set", "data.name=synthetic",
                 "--output-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("star-mamba pretrain: error: invalid config: data.sequence='same_clas'"
                               "; did you mean 'same_class'?")
    assert "random, same_class, views, clip" in lines[0]
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("sets,message", [
    (["data.view_scale=[0.5, 1]"], "data.view_scale is read only by data.sequence=views, not 'random'"),
    (["data.sequence=clip", "data.view_flip=0.1"], "data.view_flip is read only by data.sequence=views"),
    (["data.num_sequences=8"], "data.num_sequences is read only by data.sequence=same_class, views, clip"),
    (["data.sequence=clip", "data.name=imagefolder"], "data.name='imagefolder' is neither"),
    (["data.sequence=views", "data.view_scale=0.5"], "data.view_scale=0.5: expected a list"),
])
def test_config_mistakes_are_named(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        pretrain_config(tmp_path, *sets)


def test_impossible_options_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sequence='views': .*flip_prob=2.0"):
        pretrain(pretrain_config(tmp_path / "a", "data.sequence=views", "data.view_flip=2"))
    with pytest.raises(ValueError, match="3 same_class sequences are fewer than one global batch"):
        pretrain(pretrain_config(tmp_path / "b", "data.sequence=same_class", "data.num_sequences=3"))
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_interrupted_sequence_run_resumes_exactly(tmp_path):
    run = ("data.sequence=same_class", "optim.epochs=2")
    assert pretrain(pretrain_config(tmp_path / "whole", *run))["step"] == 16
    assert pretrain(pretrain_config(tmp_path / "part", *run, "run.max_steps=5"))["step"] == 5
    assert pretrain(pretrain_config(tmp_path / "part", *run))["step"] == 16  # auto-resume
    assert_same_tensors(load_checkpoint(tmp_path / "whole" / ckpt.LATEST)["model"],
                        load_checkpoint(tmp_path / "part" / ckpt.LATEST)["model"], "weights")
    assert logged_losses(tmp_path / "part") == logged_losses(tmp_path / "whole")


def test_torchrun_two_processes_match_one_on_same_class(tmp_path):
    """Same global batch (16 images = 8 sequences of 2): each rank takes 4 whole sequences."""
    one, two = pretrain_one_and_two_processes(tmp_path, "data.sequence=same_class")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    assert "(32 same_class sequences of 2), 2 process(es)" in (tmp_path / "two" / "log.txt").read_text()
