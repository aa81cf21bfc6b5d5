"""star-mamba linprobe: the converged probe of a checkpoint's frozen backbone, its feature cache,
the raw-pixel baseline, the runner's representation probe, and its one-line errors."""
import hashlib
import json

import pytest
import torch

import star_mamba
from star_mamba.cli import main
from star_mamba.data import build_image_folder
from star_mamba.data.transforms import build_eval_transform
from star_mamba.engine.config import load_config
from star_mamba.tasks.linprobe import RESULT, linprobe
from star_mamba.evaluation.config import ProbeConfig
from star_mamba.evaluation.features import extract_features
from star_mamba.evaluation.probe import probe_features, raw_pixel_baseline
from star_mamba.models.io import probe_classifier as classifier_from_pretrained
from star_mamba.seeding import seed_everything
from star_mamba.tools.runner import PIXELS, Pretraining, Probe, pixel_baseline, pretrain_then_probe

from .conftest import QUIET, TINY, TINY_DECODER, folder_pretrain_overrides

FOLDER = TINY | {"in_chans": 3}  # 16 px RGB, 4 x 4 patches, D 32, 2 blocks
FIT = ["probe.weight_decays=[1e-4, 1e-2, 1.0]", "probe.knn_k=5", "data.crop_pct=1.0"]


def probe_sets(root, out, *extra):
    """``star-mamba linprobe`` on the shapes ImageFolder (32 train, 16 val images)."""
    return [a for item in ["data.name=imagefolder", f"data.root={root}", *FIT, *QUIET,
                           f"run.output_dir={out}", *extra] for a in ("--set", item)]


def save_pretraining(path, seed):
    torch.manual_seed(seed)
    pre = star_mamba.create_pretrain_model("star_tiny", **FOLDER, **TINY_DECODER)
    torch.save({"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}, path)
    return path


def eval_images(root, split):
    """The split through the evaluation transform, built here independently of the engine."""
    return build_image_folder(root, split, build_eval_transform(16, 1.0))


def result(out):
    return json.loads((out / RESULT).read_text())


def test_linprobe_scores_a_pretraining_checkpoint_on_unaugmented_features(shapes_8, tmp_path,
                                                                          capsys):
    ckpt = save_pretraining(tmp_path / "pre.pth", seed=0)
    out = tmp_path / "probe"
    assert main(["linprobe", "--pretrained", str(ckpt), *probe_sets(shapes_8, out)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe top-1" in printed and f"wrote {out}/{RESULT}" in printed
    r = result(out)
    for key in ("linear_probe_top1", "knn_top1", "weight_decay", "heldout_top1", "feature_dim",
                "seconds_features", "seconds_linear", "seconds_knn", "seconds", "checkpoint",
                "config", "sweep", "lr_converged"):
        assert key in r, key
    assert (r["n_train"], r["n_test"], r["feature_dim"], r["eval_split"]) == (32, 16, 32, "val")
    assert r["checkpoint"] == str(ckpt) and r["config"]["task"] == "linprobe"
    assert r["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert set(r["heldout_top1"]) == {"0.0001", "0.01", "1.0"} and r["lr_converged"]
    assert r["features_cached"] == {"train": False, "test": False}
    assert "linear probe top-1" in (out / "log.txt").read_text()

    # the same numbers from features extracted here: the training split is not augmented
    model = classifier_from_pretrained(ckpt)
    train_x, train_y = extract_features(model, eval_images(shapes_8, "train"), progress=False)
    test_x, test_y = extract_features(model, eval_images(shapes_8, "val"), progress=False)
    cached = torch.load(out / "features-train.pt", weights_only=True)
    assert torch.allclose(cached["features"], train_x, atol=1e-5)
    assert torch.equal(cached["labels"], train_y)
    expected = probe_features(train_x, train_y, test_x, test_y,
                              ProbeConfig(weight_decays=(1e-4, 1e-2, 1.0), knn_k=5))
    assert r["linear_probe_top1"] == pytest.approx(expected["linear_probe_top1"])
    assert r["knn_top1"] == pytest.approx(expected["knn_top1"])
    assert r["weight_decay"] == expected["weight_decay"]


def test_features_are_cached_and_remade_when_the_checkpoint_or_a_setting_changes(shapes_8,
                                                                               tmp_path):
    ckpt = save_pretraining(tmp_path / "pre.pth", seed=0)
    out = tmp_path / "probe"
    files = [out / "features-train.pt", out / "features-test.pt"]

    def run(*extra):
        assert main(["linprobe", "--pretrained", str(ckpt), *probe_sets(shapes_8, out, *extra)]) == 0
        return result(out), [f.stat().st_mtime_ns for f in files]

    first, stamps = run()
    (out / RESULT).unlink()  # interrupted after the extraction: the fit runs again, not the rest
    again, same = run()
    assert again["features_cached"] == {"train": True, "test": True} and same == stamps
    assert again["linear_probe_top1"] == first["linear_probe_top1"]
    assert again["knn_top1"] == first["knn_top1"]

    save_pretraining(ckpt, seed=1)  # the same path, other weights
    other, changed = run()
    assert other["features_cached"] == {"train": False, "test": False}
    assert all(a != b for a, b in zip(changed, stamps)) and other["sha256"] != first["sha256"]
    taps, _ = run("probe.layers=[1, 2]")  # another setting
    assert taps["features_cached"] == {"train": False, "test": False}
    assert taps["feature_dim"] == 64
    fewer, _ = run("probe.layers=[1, 2]", "data.max_images=20")  # other images
    assert fewer["features_cached"] == {"train": False, "test": True}
    assert fewer["n_train"] == 20
    uncached = tmp_path / "uncached"
    assert main(["linprobe", "--pretrained", str(ckpt),
                 *probe_sets(shapes_8, uncached, "probe.cache_features=false")]) == 0
    assert not list(uncached.glob("features-*.pt")) and (uncached / RESULT).is_file()


def test_a_fine_tuned_classifier_is_probed_as_it_is(shapes_8, tmp_path):
    """A classifier checkpoint keeps its own model (4 directions, class token at the end):
    its class token is a feature the probe can read."""
    torch.manual_seed(0)
    clf = star_mamba.create_model("star_tiny", **FOLDER, num_classes=4, class_token="end")
    torch.save({"model": clf.state_dict(), "model_config": clf.cfg.to_dict()}, tmp_path / "c.pth")
    cfg = load_config("linprobe/fashion_mnist", [
        "data.name=imagefolder", f"data.root={shapes_8}", *FIT, *QUIET,
        f"run.output_dir={tmp_path / 'probe'}", f"run.pretrained={tmp_path / 'c.pth'}",
        "probe.pool=cls"])
    r = linprobe(cfg)
    assert r["model"]["directions"] == 4 and r["model"]["class_token"] == "end"
    expected, _ = extract_features(clf, eval_images(shapes_8, "train"), pool="cls",
                                   progress=False)
    cached = torch.load(tmp_path / "probe" / "features-train.pt", weights_only=True)
    assert torch.allclose(cached["features"], expected, atol=1e-5)


def test_no_checkpoint_probes_the_configured_model_with_random_weights(shapes_8, tmp_path):
    out = tmp_path / "scratch"
    sets = probe_sets(shapes_8, out, *(f"model.{k}={v}" for k, v in FOLDER.items()),
                      "run.seed=3")
    assert main(["linprobe", "--pretrained", "null", *sets]) == 0
    r = result(out)
    assert r["checkpoint"] is None and r["random_init_seed"] == 3
    assert (r["model"]["embed_dim"], r["model"]["num_classes"]) == (32, 4)  # 4 shape classes
    seed_everything(3)
    model = star_mamba.create_model("star_tiny", **FOLDER, num_classes=4, directions=1,
                                    class_token="none")
    expected, _ = extract_features(model, eval_images(shapes_8, "train"), progress=False)
    cached = torch.load(out / "features-train.pt", weights_only=True)
    assert torch.allclose(cached["features"], expected, atol=1e-5)


def test_pixel_baseline_is_computed_once_per_directory(shapes_8, tmp_path):
    probe = Probe("representation", "linprobe/fashion_mnist",
                  ("data.name=imagefolder", f"data.root={shapes_8}", *FIT, *QUIET,
                   *(f"model.{k}={v}" for k, v in FOLDER.items())))
    first = pixel_baseline(tmp_path, probe)
    stamp = (tmp_path / PIXELS).stat().st_mtime_ns
    expected = raw_pixel_baseline(eval_images(shapes_8, "train"), eval_images(shapes_8, "val"),
                                  ProbeConfig(weight_decays=(1e-4, 1e-2, 1.0), knn_k=5))
    assert (first["n_train"], first["n_test"], first["feature_dim"]) == (32, 16, 3 * 16 * 16)
    assert first["linear_probe_top1"] == pytest.approx(expected["linear_probe_top1"])
    assert first["knn_top1"] == pytest.approx(expected["knn_top1"])
    assert pixel_baseline(tmp_path, probe) == first
    assert (tmp_path / PIXELS).stat().st_mtime_ns == stamp  # read back, not recomputed
    fewer = pixel_baseline(tmp_path, Probe(probe.kind, probe.config,
                                           (*probe.overrides, "data.max_images=20")))
    assert fewer["n_train"] == 20 and (tmp_path / PIXELS).stat().st_mtime_ns != stamp


def test_runner_representation_probe_after_a_pretraining_and_from_scratch(shapes_8, tmp_path):
    pre = Pretraining(tuple(folder_pretrain_overrides(shapes_8, tmp_path / "unused",
                                                      "data.max_images=16")),
                      run_dir=tmp_path / "pre")
    probe = Probe("representation", "linprobe/fashion_mnist",
                  ("data.name=imagefolder", f"data.root={shapes_8}", *FIT, *QUIET,
                   *(f"model.{k}={v}" for k, v in FOLDER.items())))
    a = pretrain_then_probe(tmp_path / "a", probe, pre)
    assert a["top1"] == a["linear_probe_top1"] and a["pretrain_loss"] > 0
    for key in ("knn_top1", "weight_decay", "feature_dim", "heldout_top1"):
        assert key in a, key
    saved = result(tmp_path / "a" / "probe")
    assert saved["checkpoint"] == str(tmp_path / "pre" / "checkpoint-latest.pth")
    assert saved["linear_probe_top1"] == a["top1"]
    scratch = pretrain_then_probe(tmp_path / "s", probe)
    assert result(tmp_path / "s" / "probe")["random_init_seed"] == 0
    assert scratch["pretrain_loss"] is None and 0 <= scratch["top1"] <= 100


def assert_one_error_line(capsys, *needles):
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("star-mamba linprobe: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("extra,needles", [
    (["--pretrained", "/nowhere/pre.pth"], ["run.pretrained=/nowhere/pre.pth", "no such file"]),
    (["--set", "probe.pool=max"], ["probe.pool='max'", "allowed: avg, cls"]),
    (["--set", "probe.heldout_fraction=1.5"], ["probe.heldout_fraction=1.5", "(0, 1)"]),
    (["--set", "probe.layers=[0]"], ["probe.layers=[0]", "1-based"]),
    (["--set", "probe.precision=float16"], ["probe.precision='float16'", "float64, float32"]),
    (["--set", "probe.knn_temperature=0"], ["probe.knn_temperature=0.0", "> 0"]),
    (["-c", "finetune/fashion_mnist"], ["task 'finetune', not 'linprobe'"]),
])
def test_bad_input_is_one_line(extra, needles, capsys, tmp_path):
    assert main(["linprobe", *extra, "--output-dir", str(tmp_path / "out")]) == 2
    assert_one_error_line(capsys, *needles)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_checkpoint_or_layers_are_one_line(shapes_8, tmp_path, capsys):
    ckpt = save_pretraining(tmp_path / "pre.pth", seed=0)
    assert main(["linprobe", "--pretrained", str(tmp_path),
                 *probe_sets(shapes_8, tmp_path / "o")]) == 2
    assert_one_error_line(capsys, "is a directory", "checkpoint-latest.pth")
    assert main(["linprobe", "--pretrained", str(ckpt),
                 *probe_sets(shapes_8, tmp_path / "o", "probe.layers=[1, 5]")]) == 2
    assert_one_error_line(capsys, "probe.layers=[1, 5]", "has 2 blocks")
    assert main(["linprobe", "--pretrained", str(ckpt),
                 *probe_sets(shapes_8, tmp_path / "o", "probe.pool=cls")]) == 2
    assert_one_error_line(capsys, "pool='cls' needs a model with a class token")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert main(["linprobe", "--pretrained", str(tmp_path / "bad.pth"),
                 *probe_sets(shapes_8, tmp_path / "o")]) == 2
    assert_one_error_line(capsys, "cannot load checkpoint", "bad.pth")
