"""What several test files share: tiny model shapes, tiny run configs, generated image folders,
damaged files, the package logger's records, subprocess runs of the CLI, weight comparisons and
a skip for the built-in Fashion-MNIST data.

Helpers are plain functions (``from .conftest import ...``); fixtures are below them.
"""
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import star_mamba
from star_mamba.data.fashion_mnist import find_fashion_mnist
from star_mamba.engine.config import load_config
from star_mamba.engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------ tiny models

MICRO = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2)  # 4 x 4 patches
MICRO_DECODER = dict(cluster_size=2, decoder_dim=16, decoder_depth=2, decoder_heads=2)
TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2)  # 4 x 4 patches
TINY_DECODER = dict(cluster_size=2, decoder_dim=32, decoder_depth=2, decoder_heads=2,
                    images_per_sequence=2)


def micro_pretrain(seed: int = 0, **overrides):
    """The smallest pretraining model (8 px, 2 px patches, 2 x 2 clusters), in eval mode."""
    torch.manual_seed(seed)
    return star_mamba.create_pretrain_model(
        "star_tiny", **{**MICRO, **MICRO_DECODER, **overrides}).eval()


def tiny_classifier(seed: int = 0, **overrides):
    """A 16 px classifier on 1-channel images (4 x 4 patches of 4 px)."""
    torch.manual_seed(seed)
    return star_mamba.create_model("star_tiny", **{**TINY, "num_classes": 3, **overrides})


# ------------------------------------------------------------------------------ tiny runs

def as_overrides(section: str, values: dict) -> list[str]:
    return [f"{section}.{key}={value}" for key, value in values.items()]


QUIET = ["run.progress=false", "run.tensorboard=false", "run.log_every=1", "run.threads=1"]

# Pretraining the TINY model on 64 synthetic images: 8 steps of 8 images per epoch.
PRETRAIN_RUN = [*as_overrides("model", {**TINY, **TINY_DECODER}), "data.name=synthetic",
                "data.synthetic_images=64", "data.num_workers=0", "optim.batch_size=8",
                "optim.blr=2e-2", "optim.warmup_epochs=0.5", "optim.epochs=3", *QUIET]


def pretrain_config(out, *extra: str):
    return load_config("pretrain/fashion_mnist", [*PRETRAIN_RUN, f"run.output_dir={out}", *extra])


def folder_pretrain_overrides(root, out, *extra: str) -> list[str]:
    """Pretraining the TINY model (3 channels) on an ImageFolder tree (ARM's random crops and
    flips, drawn in the workers), 4 images per step."""
    return [*PRETRAIN_RUN, "model.in_chans=3", "data.name=imagefolder", f"data.root={root}",
            "optim.batch_size=4", "optim.epochs=1", f"run.output_dir={out}", *extra]


def finetune_overrides(root, out, *extra: str) -> list[str]:
    """Fine-tuning a 32 px classifier on :func:`make_shapes` with the whole recipe: RandAugment,
    random erasing, mixup/cutmix, drop path, layer decay, EMA; one epoch."""
    return ["model.name=star_tiny", "model.img_size=32", "model.patch_size=8",
            "model.in_chans=3", "model.embed_dim=32", "model.depth=2", "model.num_classes=4",
            "model.directions=2", "model.drop_path_rate=0.2", f"data.root={root}",
            "data.name=imagefolder", "data.eval_split=val", "data.max_eval_images=8",
            "data.scale=[0.5, 1.0]", "data.auto_augment=rand-m9-mstd0.5", "data.reprob=0.25",
            "optim.lr=2e-3", "optim.warmup_epochs=0",
            "optim.epochs=1", "optim.layer_decay=0.75", "optim.mixup=0.8", "optim.cutmix=1.0",
            "optim.mixup_prob=1.0", "optim.mixup_switch_prob=0.5", "run.ema_decay=0.5",
            "run.pretrained=null", *QUIET, f"run.output_dir={out}", *extra]


def finetune_config(root, out, *extra: str):
    return load_config("finetune/fashion_mnist", finetune_overrides(root, out, *extra))


# ------------------------------------------------------------------------------ files

SHAPES = ("disc", "square", "hbar", "vbar")


def make_shapes(root: Path, per_class: int = 24, size: int = 32) -> list[Path]:
    """A tiny learnable ImageFolder: four shape classes at random places, ``per_class`` PNGs
    per class in train/ and half as many in val/. Returns the train files in ImageFolder's
    index order."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for kind in SHAPES:
            (root / split / kind).mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", (size, size), (20, 20, 20))
                d = ImageDraw.Draw(img)
                x, y = (torch.randint(4, size - 16, (2,), generator=gen)).tolist()
                box = {"disc": (x, y, x + 12, y + 12), "square": (x, y, x + 12, y + 12),
                       "hbar": (x, y + 4, x + 14, y + 8), "vbar": (x + 4, y, x + 8, y + 14)}[kind]
                (d.ellipse if kind == "disc" else d.rectangle)(box, fill=(230, 230, 230))
                img.save(root / split / kind / f"{i}.png")
    return sorted((root / "train").glob("*/*.png"))


def make_noise_images(root: Path, per_class: int = 4, classes: int = 4, size: int = 32) -> None:
    """An ImageFolder of uniform-noise PNGs (train/ and val/): any two images differ at
    almost every pixel, so where one replaced the other is visible."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", max(1, per_class // 2))):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")


def truncate(path: Path) -> bytes:
    """Cut a file to its first half (a crash mid-write, a partial copy); returns what is left."""
    data = Path(path).read_bytes()[: Path(path).stat().st_size // 2]
    Path(path).write_bytes(data)
    return data


# ------------------------------------------------------------------------------ comparisons

def assert_same_tensors(a: dict, b: dict, what: str = "", **tolerance) -> None:
    """Same keys and bit-identical tensors, or close ones with ``rtol``/``atol`` given."""
    assert a.keys() == b.keys(), what
    for key in a:
        if tolerance:
            torch.testing.assert_close(a[key], b[key], **tolerance, msg=lambda m: f"{what} {key}: {m}")
        else:
            assert torch.equal(a[key], b[key]), f"{what} {key}"


# ------------------------------------------------------------------------------ subprocesses

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(args: list[str], env: Optional[dict] = None, timeout: int = 300):
    """``python -m ARGS`` from the repository root, one thread, output captured as text."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True)


def run_cli(command: str, sets: list[str], *torchrun: str, env: Optional[dict] = None,
            timeout: int = 300):
    """``star-mamba COMMAND --set ...``; under ``torch.distributed.run TORCHRUN...`` if given."""
    launcher = ["torch.distributed.run", "--standalone", *torchrun, "-m"] if torchrun else []
    return run_module([*launcher, "star_mamba", command, *(f"--set={s}" for s in sets)],
                      env=env, timeout=timeout)


def output_of(done) -> str:
    return done.stdout[-3000:] + done.stderr[-3000:]


def logged_losses(out_dir) -> list[float]:
    """The loss of every metrics.jsonl row a run wrote."""
    return [row["loss"] for row in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in row]


def pretrain_one_and_two_processes(tmp_path, *extra: str) -> tuple[list[float], list[float]]:
    """The same tiny pretraining with a global batch of 16 images: 1 process x 16 and, under
    torchrun, 2 processes x 8. Returns the logged losses of each (tmp_path/"one", "two")."""
    for nproc, batch, name in ((1, 16, "one"), (2, 8, "two")):
        done = run_cli("pretrain", [*PRETRAIN_RUN, *extra, "optim.epochs=1", "optim.blr=1e-2",
                                    f"optim.batch_size={batch}",
                                    f"run.output_dir={tmp_path / name}"],
                       f"--nproc_per_node={nproc}")
        assert done.returncode == 0, output_of(done)
    return logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")


# ------------------------------------------------------------------------------ data skips

def _fashion_mnist_missing() -> Optional[str]:
    try:
        find_fashion_mnist()
    except FileNotFoundError as e:
        return str(e)
    return None


_MISSING = _fashion_mnist_missing()
requires_fashion_mnist = pytest.mark.skipif(
    _MISSING is not None,
    reason="the built-in Fashion-MNIST data is absent (`apt-get install dataset-fashion-mnist` "
           "or STAR_MAMBA_DATA=DIR): " + (_MISSING or "")[:200])


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture
def star_log(caplog):
    """caplog for the package logger (warnings and up), which does not propagate to the root."""
    logger = logging.getLogger("star_mamba")
    propagate, logger.propagate = logger.propagate, False  # each record once
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


@pytest.fixture(scope="session")
def shapes_8(tmp_path_factory) -> Path:
    """:func:`make_shapes` with 8 images per class (32 train, 16 val); read-only for tests."""
    root = tmp_path_factory.mktemp("shapes_8")
    make_shapes(root, per_class=8)
    return root
