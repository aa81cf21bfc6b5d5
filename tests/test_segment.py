"""star-mamba segment end to end: ADE20K-layout and mask-folder trees a test writes (ignored
pixels, a grayscale image, a broken file), eval of the checkpoint, the built-in scenes under
one and two processes, the recipes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from star_mamba.engine.config import load_config

from .conftest import QUIET, as_overrides, assert_same_tensors, output_of, run_cli, run_module

MODEL = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=4, directions=2,
             class_token="none", drop_path_rate=0.0)
SMALL = [*as_overrides("model", MODEL), "segment.channels=16", "segment.aux_channels=8",
         "segment.gn_groups=4", "optim.batch_size=4", "optim.epochs=1", "run.pretrained=null",
         "data.num_workers=0", *QUIET]
SCENES = [*SMALL, "model.in_chans=1", "data.name=scenes", "data.scene_canvas=32",
          "data.scene_images=32", "data.max_eval_images=8", "data.scene_source=shapes"]


def _write_pair(image_path: Path, mask_path: Path, size, labels, seed: int, mode="RGB"):
    rng = np.random.default_rng(seed)
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2] = labels[0]
    mask[h // 2:] = labels[1]
    mask[:2, :2] = labels[2]  # the corner: label 0 (ignored in ADE20K) or 255 (ignored)
    pixels = (rng.random((h, w, 3)) * 60 + mask[..., None] * 40).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("L") if mode == "L" else image).save(image_path)
    Image.fromarray(mask).save(mask_path)


def _ade20k_tree(root: Path) -> Path:
    for split, count in (("training", 6), ("validation", 3)):
        for i in range(count):
            size = (32, 32) if split == "training" else (24 + 8 * i, 40)  # eval at its own size
            _write_pair(root / "images" / split / f"ADE_{split}_{i:04d}.jpg",
                        root / "annotations" / split / f"ADE_{split}_{i:04d}.png", size,
                        (1 + i % 3, 4, 0), seed=i, mode="L" if i == 1 else "RGB")
    (root / "images" / "training" / "ADE_training_0005.jpg").write_bytes(b"not a jpeg")
    return root


def _read_eval(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def test_ade20k_layout_trains_and_evaluates_through_the_cli(tmp_path):
    root, out = _ade20k_tree(tmp_path / "ADEChallengeData2016"), tmp_path / "run"
    done = run_cli("segment", [*SMALL, "data.name=ade20k", f"data.root={root}",
                               "data.max_bad_fraction=0.5", f"run.output_dir={out}"])
    assert done.returncode == 0, output_of(done)
    log = (out / "log.txt").read_text()
    assert "ADE_training_0005.jpg" in log  # the broken file is named
    result = _read_eval(out)
    assert {"mIoU", "mAcc", "aAcc", "per_class"} <= result.keys()
    assert len(result["per_class"]) == 150 and result["per_class"][0]["class"] == "wall"
    present = [c for c in result["per_class"] if not np.isnan(c["Acc"])]
    assert {c["class"] for c in present} <= {"wall", "building", "sky", "floor"}  # labels 1-4
    assert (out / "checkpoint-best.pth").exists() and (out / "predictions.png").exists()

    again = run_module_eval(out / "checkpoint-best.pth")
    assert again["mIoU"] == pytest.approx(result["mIoU"], abs=1e-9)
    assert again["aAcc"] == pytest.approx(result["aAcc"], abs=1e-9)


def run_module_eval(checkpoint: Path) -> dict:
    done = run_module(["star_mamba", "eval", "--checkpoint", str(checkpoint)])
    assert done.returncode == 0, output_of(done)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mask_folder_with_class_list_trains_skips_a_broken_mask_and_ignores_255(tmp_path):
    root, out = tmp_path / "mine", tmp_path / "run"
    (root).mkdir()
    (root / "classes.txt").write_text("road\ncar\nsky\ntree\nhouse\n")
    for split, count in (("train", 5), ("val", 2)):
        for i in range(count):
            _write_pair(root / "images" / split / f"{i}.png", root / "masks" / split / f"{i}.png",
                        (32, 32), (i % 2, 2 + i % 3, 255), seed=10 + i, mode="L" if i == 2 else "RGB")
    (root / "masks" / "train" / "4.png").write_bytes(b"\x89PNG broken")
    done = run_cli("segment", [*SMALL, "data.name=seg_folder", f"data.root={root}",
                               "data.max_bad_fraction=0.5", f"run.output_dir={out}"])
    assert done.returncode == 0, output_of(done)
    assert "4.png" in (out / "log.txt").read_text()  # the broken mask is named
    result = _read_eval(out)
    assert [c["class"] for c in result["per_class"]] == ["road", "car", "sky", "tree", "house"]
    assert 0 <= result["mIoU"] <= 100 and 0 <= result["aAcc"] <= 100


def test_a_label_outside_the_class_list_is_one_line_naming_the_mask(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    for split in ("train", "val"):
        for i in range(4):
            _write_pair(root / "images" / split / f"{i}.png", root / "masks" / split / f"{i}.png",
                        (32, 32), (0, 7 if (split, i) == ("train", 1) else 1, 255), seed=i)
    done = run_cli("segment", [*SMALL, "data.name=seg_folder", f"data.root={root}",
                               f"run.output_dir={tmp_path / 'run'}"])
    assert done.returncode == 2, output_of(done)
    assert "Traceback" not in done.stderr
    assert "1.png" in done.stderr and "7" in done.stderr


@pytest.mark.slow
def test_two_processes_give_the_mIoU_of_one(tmp_path):
    """The same global batch of 8 in the same micro-batches of 4 (so dropout draws the same
    numbers): 1 process x accum 2 and 2 processes x accum 1 train the same weights and score
    the same mIoU, the scores summed exactly over ranks."""
    results, weights = [], []
    for nproc, accum in ((1, 2), (2, 1)):
        out = tmp_path / f"p{nproc}"
        done = run_cli("segment", [*SCENES, "optim.batch_size=4", f"optim.accum_iter={accum}",
                                   "optim.lr=2e-3", f"run.output_dir={out}"],
                       f"--nproc_per_node={nproc}")
        assert done.returncode == 0, output_of(done)
        results.append(_read_eval(out))
        weights.append(torch.load(out / "checkpoint-latest.pth", weights_only=True)["model"])
    assert_same_tensors(*weights, "weights", rtol=1e-5, atol=1e-7)
    one, two = results
    for key in ("mIoU", "mAcc", "aAcc"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert "2 process(es)" in (tmp_path / "p2" / "log.txt").read_text()


def test_missing_default_backbone_is_a_warning_and_a_random_start(tmp_path):
    # run where runs/pretrain_fashion_mnist/ does not exist (the checkout may hold one)
    sets = [s for s in SCENES if s != "run.pretrained=null"]
    done = subprocess.run([sys.executable, "-m", "star_mamba", "segment", "--set=run.max_steps=1",
                           *(f"--set={s}" for s in sets), "--set=run.output_dir=run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, output_of(done)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "runs/pretrain_fashion_mnist/checkpoint-latest.pth does not exist" in log
    assert "starts from random weights" in log


def test_recipes_load_with_their_numbers():
    base = load_config("segment/star_base_ade20k")
    assert (base.model.name, base.model.star_config().img_size) == ("star_base", 512)
    assert base.optim.schedule == "poly" and base.optim.layer_decay == 0.92
    assert base.run.max_steps == 160000 and base.segment.infer_mode == "slide"
    assert base.segment.infer_stride == 341 and base.data.seg_base_scale == (2048, 512)
    large = load_config("segment/star_large_ade20k")
    assert large.model.star_config().depth == 24 and large.segment.channels == 1024
    default = load_config("segment/scenes")
    assert default.task == "segment" and default.data.name == "scenes"
    assert default.segment.head == "upernet"
    assert load_config("segment/scenes_linear").segment.head == "linear"
