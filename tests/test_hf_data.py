"""data.name=hf: a Hugging Face dataset saved to disk (written here, a few tiny images)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from star_mamba import checkpoint as ckpt
from star_mamba.data import build_dataset
from star_mamba.data.folder import collect_unreadable
from star_mamba.data.transforms import build_pretrain_transform
from star_mamba.engine.config import load_config
from star_mamba.tasks.pretrain import pretrain
from star_mamba.errors import ConfigError

from .conftest import PRETRAIN_RUN

datasets = pytest.importorskip("datasets", reason="the test extra installs datasets")


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DatasetDict (train: 16 rows, test: 4) with an Image column ``img`` and a ClassLabel
    column ``y``; train row 3 holds bytes that are not an image, row 5 a 16-bit grey image."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(),
                                  "y": datasets.ClassLabel(names=["a", "b", "c"])})
    splits = {}
    for split, n in (("train", 16), ("test", 4)):
        images = [{"bytes": png(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)), "path": None}
                  for _ in range(n)]
        if split == "train":
            images[3] = {"bytes": b"not an image", "path": None}
            images[5] = {"bytes": png((rng.integers(0, 65535, (20, 24))).astype(np.uint16)),
                         "path": None}
        splits[split] = datasets.Dataset.from_dict(
            {"img": images, "y": [i % 3 for i in range(n)]}, features=features)
    root = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def test_items_labels_classes_and_an_unreadable_image(saved):
    ds = build_dataset("hf", root=saved, split="train", transform=build_pretrain_transform(16),
                       image_column="img", label_column="y")
    assert len(ds) == 16 and ds.classes == ["a", "b", "c"] and ds.targets[:4] == [0, 1, 2, 0]
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0
    grey, _ = ds[5]
    assert torch.allclose(grey[0] * 0.229 + 0.485, grey[1] * 0.224 + 0.456, atol=1e-5)  # R = G
    with collect_unreadable() as reports:
        x3, y3 = ds[3]  # replaced by the next readable row, reported by its own index
    assert y3 == 4 % 3 and reports == [(3, f"{saved} (train)[3]", reports[0][2])]
    assert "UnidentifiedImageError" in reports[0][2]


def test_missing_columns_split_or_dataset_give_one_clear_error(saved, tmp_path):
    with pytest.raises(ConfigError, match=r"data.image_column='image' is not a column of .* "
                                          r"\(columns: img, y\)"):
        build_dataset("hf", root=saved, split="train", label_column="y")
    with pytest.raises(ConfigError, match="data.label_column='label' is not a column"):
        build_dataset("hf", root=saved, split="train", image_column="img")
    with pytest.raises(ConfigError, match=r"split 'validation' is not in .* \(splits: train, test\)"):
        build_dataset("hf", root=saved, split="validation", image_column="img", label_column="y")
    with pytest.raises(ConfigError, match=r"data.root=\S+nowhere does not exist"):
        build_dataset("hf", root=tmp_path / "nowhere", split="train")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="is not a saved dataset with a split 'train'"):
        build_dataset("hf", root=tmp_path / "plain", split="train")


def test_one_saved_dataset_per_split_folder(saved, tmp_path):
    datasets.load_from_disk(str(saved))["test"].save_to_disk(str(tmp_path / "test"))
    ds = build_dataset("hf", root=tmp_path, split="test", image_column="img", label_column="y")
    assert len(ds) == 4


def test_pretraining_on_a_saved_dataset(saved, tmp_path):
    result = pretrain(load_config("pretrain/fashion_mnist", [
        *PRETRAIN_RUN, "model.in_chans=3", "data.name=hf", f"data.root={saved}",
        "data.image_column=img", "data.label_column=y", "data.num_workers=2",
        "data.max_bad_fraction=0.1", "optim.batch_size=4", "optim.epochs=1",
        f"run.output_dir={tmp_path}"]))
    assert result["step"] == 4
    state = ckpt.load_checkpoint(tmp_path / ckpt.LATEST)["state"]
    assert state["step"] == 4 and state["epoch"] == 1


HF_CLASSIFIER = ["model.name=star_tiny", "model.img_size=16", "model.patch_size=4",
                 "model.in_chans=3", "model.embed_dim=16", "model.depth=1", "data.name=hf",
                 "data.image_column=img", "data.label_column=y", "data.num_workers=0",
                 "data.max_bad_fraction=0.1", "run.pretrained=null", "run.progress=false",
                 "run.tensorboard=false"]


def test_converged_linear_probe_on_a_saved_dataset(saved, tmp_path):
    from star_mamba.tasks.linprobe import linprobe
    result = linprobe(load_config("linprobe/fashion_mnist", [
        *HF_CLASSIFIER, f"data.root={saved}", "probe.knn_k=3", f"run.output_dir={tmp_path}"]))
    assert (result["n_train"], result["n_test"], result["feature_dim"]) == (16, 4, 16)
    for key in ("linear_probe_top1", "knn_top1"):  # 4 test rows: multiples of 25%
        assert result[key] in (0.0, 25.0, 50.0, 75.0, 100.0), result[key]
    assert (tmp_path / "linprobe.json").is_file()


def test_head_only_finetune_and_eval_on_a_saved_dataset(saved, tmp_path):
    from star_mamba.tasks.finetune import evaluate_checkpoint, finetune
    finetune(load_config("finetune/fashion_mnist", [
        *HF_CLASSIFIER, f"data.root={saved}", "optim.batch_size=4", "optim.epochs=1",
        "run.linprobe=true", f"run.output_dir={tmp_path}"]))
    metrics = evaluate_checkpoint(tmp_path / ckpt.LATEST)  # the 'test' split, 4 rows
    assert metrics["top1"] * 4 / 100 == pytest.approx(round(metrics["top1"] * 4 / 100))


def test_diagnostics_and_viz_run_on_a_saved_dataset(saved, tmp_path):
    """Held-out images are the 'test' rows through the evaluation transform; viz shows them
    with ImageNet's mean and std undone."""
    import json

    import torchvision.transforms as T
    from star_mamba.data.build import held_out_images
    from star_mamba.data.transforms import build_eval_transform
    from star_mamba.engine.metrics import read_metrics
    from star_mamba.tools import viz
    cfg = load_config("pretrain/fashion_mnist", [
        *PRETRAIN_RUN, "model.in_chans=3", "data.name=hf", f"data.root={saved}",
        "data.image_column=img", "data.label_column=y", "data.num_workers=0",
        "data.max_bad_fraction=0.1", "optim.batch_size=4", "optim.epochs=1", "run.max_steps=2",
        "run.diag_every=2", "run.diag_images=4", f"run.output_dir={tmp_path / 'run'}"])
    pretrain(cfg)
    diags = [r["diag"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "diag" in r]
    assert len(diags) == 1 and diags[0]["images"] == 4

    held = held_out_images(cfg.data, cfg.model.star_config(), 4)  # all 4 test rows, drawn
    tf = build_eval_transform(16, cfg.data.crop_pct)
    photos = [Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB") for row in
              datasets.load_from_disk(str(saved))["test"].cast_column(
                  "img", datasets.Image(decode=False))]
    expected = torch.stack([tf(im) for im in photos])
    order = [next(j for j in range(4) if torch.allclose(h, expected[j])) for h in held]
    assert sorted(order) == [0, 1, 2, 3]
    unnormalised = torch.stack([T.Compose(tf.transforms[:-1])(photos[j]) for j in order])
    torch.testing.assert_close(cfg.data.spec.display(held), unnormalised, atol=1e-6, rtol=0)

    out = viz.visualize(tmp_path / "run" / ckpt.LATEST, tmp_path / "viz", cfg, num_sequences=1,
                        max_batches=1)
    assert (out["data"], out["split"], out["sequences"]) == ("hf", "test", 2)
    assert json.loads((tmp_path / "viz" / "diagnostics.json").read_text())["logged"]
