"""Shards: prepare-data (odd and broken files, resume, parallel writers, WebDataset layout), the
streamed reader (equal batches per rank, determinism, exact resume, bad data), training on
shards from the command line and under torchrun."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from star_mamba import checkpoint as ckpt
from star_mamba.cli import main
from star_mamba.data import prepare as prepare_module
from star_mamba.data.prepare import PrepareOptions, parse_size, prepare_data
from star_mamba.data.shards import (ShardError, ShardPlan, build_shard_set, buffer_order,
                                    index_pieces, read_index, read_shard)
from star_mamba.data.transforms import build_pretrain_transform
from star_mamba.engine.config import load_config
from star_mamba.tasks.pretrain import pretrain
from star_mamba.errors import ConfigError, UserError

from .conftest import (PRETRAIN_RUN, assert_same_tensors, logged_losses, output_of, run_cli,
                       truncate)

skimage = pytest.importorskip("skimage", reason="the test extra installs scikit-image")
from star_mamba.tools.bench_input import make_photo_folder  # noqa: E402

SMALL = dict(short_side=16, shard_size=12000)  # tiny images, about 4 per shard


def photo_tree(root: Path, per_class: int = 5, val: int = 2) -> dict:
    """4 photo classes of 40 x 30 JPEGs (train: ``per_class`` each, val: ``val`` each), plus odd
    images that convert and broken files that are skipped, in train/. Returns the broken names
    and the number of readable train images."""
    make_photo_folder(root, {"train": per_class, "val": val}, size=(40, 30), classes=4)
    good = root / "train" / "astronaut"
    rgb = np.asarray(Image.open(good / "0.jpg"))
    Image.fromarray(rgb[..., 0]).save(good / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])).save(good / "rgba.png")
    Image.fromarray(rgb).convert("P").save(good / "palette.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(good / "deep16.png")
    Image.fromarray(rgb[:1, :1]).save(good / "one_pixel.png")
    broken = root / "train" / "coffee"
    (broken / "text.jpg").write_text("not an image")
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "cut.jpg").write_bytes((broken / "0.jpg").read_bytes())
    truncate(broken / "cut.jpg")
    return {"broken": {"text.jpg", "empty.jpg", "cut.jpg"}, "train_good": 4 * per_class + 5}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A photo tree and its shards (2 writer processes), read-only for the tests."""
    root = tmp_path_factory.mktemp("shards")
    info = photo_tree(root / "src")
    lines = []
    prepare_data(root / "src", root / "out", PrepareOptions(**SMALL), workers=2, echo=lines.append)
    return dict(src=root / "src", out=root / "out", lines=lines, **info)


def shard_labels(out: Path, split: str = "train") -> list[int]:
    """The class index of every sample in index order, read straight from the tar files."""
    index = read_index(str(out), split)
    return [int(s["cls"]) for k in range(len(index.shards)) for _, s in read_shard(index.url(k))]


# ------------------------------------------------------------------------------ prepare-data

def test_prepare_data_writes_webdataset_shards_an_index_and_names_broken_files(prepared):
    out, index = prepared["out"], json.loads((prepared["out"] / "train" / "index.json").read_text())
    assert index["classes"] == ["astronaut", "chelsea", "coffee", "rocket"]
    assert index["num_samples"] == prepared["train_good"] == sum(s["samples"] for s in index["shards"])
    assert len(index["shards"]) >= 4 and index["options"]["short_side"] == 16
    assert {Path(s["path"]).name for s in index["skipped"]} == prepared["broken"]
    for name in prepared["broken"]:  # each named in the output
        assert sum(name in line and "skipped unreadable" in line for line in prepared["lines"]) == 1
    assert [p.name for p in sorted((out / "train").iterdir())] == \
        ["index.json", *(f"shard-{k:06d}.tar" for k in range(len(index["shards"])))]
    # every sample: an RGB JPEG with its short side at 16 (the 1-pixel image kept as it is)
    labels, sizes = [], []
    for k in range(len(index["shards"])):
        for key, sample in read_shard(str(out / "train" / index["shards"][k]["name"])):
            assert set(sample) == {"jpg", "cls"} and re.fullmatch(r"\d{9}", key)
            img = Image.open(__import__("io").BytesIO(sample["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB"
            sizes.append(min(img.size))
            labels.append(int(sample["cls"]))
    assert sorted(sizes) == [1] + [16] * (len(sizes) - 1)
    # the labels are ImageFolder's: 5 + 5 odd astronauts, 5 of every other class (coffee's
    # broken files skipped)
    assert np.bincount(labels).tolist() == [10, 5, 5, 5]
    assert labels[:8] != sorted(labels[:8])  # shuffled before sharding: classes mixed


def test_shards_are_read_by_the_webdataset_package(prepared):
    wds = pytest.importorskip("webdataset")
    url = str(prepared["out"] / "train" / "shard-000000.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False).decode("pil"))
    assert samples and all(s["jpg"].mode == "RGB" and int(s["cls"]) in range(4) for s in samples)


def test_prepare_data_resumes_keeping_finished_shards_and_refuses_other_options(tmp_path, monkeypatch):
    photo_tree(tmp_path / "src", per_class=3, val=1)
    prepare_data(tmp_path / "src", tmp_path / "whole", PrepareOptions(**SMALL), workers=1,
                 echo=lambda _: None)
    real, written = prepare_module.write_shard, []

    def interrupted(task):  # the process dies while writing the third shard
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(task.number)
        return real(task)

    monkeypatch.setattr(prepare_module, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(tmp_path / "src", tmp_path / "out", PrepareOptions(**SMALL), workers=1,
                     echo=lambda _: None)
    monkeypatch.setattr(prepare_module, "write_shard", real)
    train = tmp_path / "out" / "train"
    assert not (train / "index.json").exists() and len(list(train.glob("shard-*.tar"))) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in train.glob("shard-*.tar")}
    lines = []
    prepare_data(tmp_path / "src", tmp_path / "out", PrepareOptions(**SMALL), workers=2,
                 echo=lines.append)
    assert any("(2 already written, kept)" in line for line in lines)
    assert {p: (train / p).stat().st_mtime_ns for p in stamps} == stamps  # not rewritten
    for split in ("train", "val"):  # the same bytes as an uninterrupted run
        whole = json.loads((tmp_path / "whole" / split / "index.json").read_text())
        resumed = json.loads((tmp_path / "out" / split / "index.json").read_text())
        assert resumed["shards"] == whole["shards"]
        for s in whole["shards"]:
            assert (tmp_path / "out" / split / s["name"]).read_bytes() == \
                (tmp_path / "whole" / split / s["name"]).read_bytes()
    # finished: checked and kept; a lost shard is written again
    (train / "shard-000001.tar").unlink()
    lines.clear()
    prepare_data(tmp_path / "src", tmp_path / "out", PrepareOptions(**SMALL), echo=lines.append)
    assert any("wrote shard-000001.tar" in line for line in lines)
    assert any("already prepared" in line for line in lines)  # val
    with pytest.raises(UserError, match=r"other options \(options differ: short_side 16 -> 20\)"):
        prepare_data(tmp_path / "src", tmp_path / "out", PrepareOptions(short_side=20, shard_size=12000))


def test_prepare_data_command_line(tmp_path, capsys):
    photo_tree(tmp_path / "src", per_class=2, val=1)
    assert main(["prepare-data", str(tmp_path / "src"), str(tmp_path / "out"), "--short-side",
                 "16", "--shard-size", "4KiB", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "skipped unreadable" in text and "cut.jpg" in text
    assert "train with --set data.name=shards --set data.root=" in text
    assert main(["prepare-data", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "SRC" in capsys.readouterr().err
    assert parse_size("128MiB") == 128 * 2 ** 20 and parse_size("100MB") == 10 ** 8
    assert parse_size("4096") == 4096
    with pytest.raises(UserError, match="--shard-size"):
        parse_size("lots")


# ------------------------------------------------------------------------------ the plan

def test_buffer_order_is_a_seeded_permutation():
    rng = lambda: np.random.default_rng(3)  # noqa: E731
    order = buffer_order(50, 8, rng())
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert np.array_equal(order, buffer_order(50, 8, rng()))
    assert buffer_order(5, 0, rng()).tolist() == [0, 1, 2, 3, 4]
    # position p arrives after 8 emissions' worth of earlier ones: it is never used before p - 7
    first_use = np.argsort(order)
    assert all(first_use[p] >= p - 8 + 1 for p in range(8, 50))


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 3), (2, 2), (3, 1)])
def test_every_rank_gets_the_same_batches_and_no_sample_twice(prepared, world, workers):
    index = read_index(str(prepared["out"]), "train")
    n, batch = index.num_samples, 4
    plans = [ShardPlan(index, index_pieces(index.counts), batch, r, world, workers, seed=1)
             for r in range(world)]
    expected = n // (batch * world)
    seen = []
    for epoch in (0, 1):
        ids = []
        for plan in plans:
            plan.set_epoch(epoch)
            assert plan.batches_per_epoch == expected
            ids += [i for b in range(expected) for i in plan.batch_indices(b)]
        assert len(ids) == len(set(ids)) == expected * batch * world
        seen.append(ids)
    assert seen[0] != seen[1]  # a new order each epoch


def test_stream_reads_what_the_plan_says_and_resumes_in_order(prepared):
    """Labels read by 2 workers are those of the plan's ids; starting at batch 3 gives the
    same batches (images and labels, bit for bit) as the tail of a whole pass."""
    labels = shard_labels(prepared["out"])
    shards = build_shard_set(str(prepared["out"]), "train", build_pretrain_transform(16),
                             shuffle_buffer=6)

    def epoch_batches(start, workers=2, epoch=1):
        loader = shards.train_loader(4, workers=workers, seed=7)
        loader.sampler.set_epoch(epoch, start)
        return loader, [(x, y) for (x, y), _ in loader]

    loader, whole = epoch_batches(0)
    assert len(whole) == loader.sampler.batches_per_epoch == 25 // 4
    for b, (x, y) in enumerate(whole):
        assert x.shape == (4, 3, 16, 16)
        assert y.tolist() == [labels[i] for i in loader.sampler.batch_indices(b)]
    _, tail = epoch_batches(3)
    assert len(tail) == len(whole) - 3
    for (x, y), (x2, y2) in zip(whole[3:], tail):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    _, again = epoch_batches(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, again))  # deterministic
    _, other = epoch_batches(0, epoch=2)
    assert not torch.equal(whole[0][0], other[0][0])


# ------------------------------------------------------------------------------ bad data

def test_wrong_root_missing_or_damaged_index_give_one_clear_error(prepared, tmp_path):
    with pytest.raises(ConfigError, match=r"data.root=\S+nowhere does not exist"):
        read_index(str(tmp_path / "nowhere"), "train")
    with pytest.raises(ConfigError, match=r"no shard index \S+train/index.json.*prepare-data"):
        read_index(str(prepared["src"]), "train")  # the ImageFolder, not its shards
    (tmp_path / "bad" / "train").mkdir(parents=True)
    (tmp_path / "bad" / "train" / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match="index.json is not a shard index"):
        read_index(str(tmp_path / "bad"), "train")
    (tmp_path / "bad" / "train" / "index.json").write_text('{"format": "other"}')
    with pytest.raises(ShardError, match="not a star-mamba shard index"):
        read_index(str(tmp_path / "bad"), "train")


def _copy(prepared, tmp_path) -> Path:
    import shutil
    shutil.copytree(prepared["out"], tmp_path / "out")
    return tmp_path / "out"


def test_corrupt_shard_stops_with_one_line_naming_it(prepared, tmp_path, capsys):
    out = _copy(prepared, tmp_path)
    shard = out / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])  # cut inside its first image
    shards = build_shard_set(str(out), "train", build_pretrain_transform(16), shuffle_buffer=0)
    with pytest.raises(ShardError, match=r"shard \S+shard-000001.tar (is corrupt or truncated|"
                                         r"holds \d+ samples but its index says)"):
        for _ in shards.train_loader(4, workers=2):
            pass
    sets = [*PRETRAIN_RUN, "model.in_chans=3", "data.name=shards", f"data.root={out}",
            "optim.batch_size=4", "data.shuffle_buffer=0", "data.num_workers=2",
            f"run.output_dir={tmp_path / 'run'}"]
    assert main(["pretrain", *(f"--set={s}" for s in sets)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"star-mamba pretrain: error: shard \S+shard-000001.tar [^\n]+\n", err), err


def test_image_that_does_not_decode_is_replaced_and_reported(prepared, tmp_path):
    """A damaged JPEG inside a readable shard: replaced by the next image of its batch,
    reported with its id and key once."""
    import io
    import tarfile
    out = _copy(prepared, tmp_path)
    path = out / "train" / "shard-000000.tar"
    members = []
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for k, (m, data) in enumerate(members):
            data = data[:20] if k == 0 else data  # the first sample's JPEG cut short
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    shards = build_shard_set(str(out), "train", build_pretrain_transform(16))
    reports = [r for (x, _), rs in shards.train_loader(5, workers=0) for r in rs]  # all 25
    assert len(reports) == 1 and reports[0][0] == 0
    assert reports[0][1].endswith(f"shard-000000.tar#{members[0][0].name.split('.')[0]}")


def test_shards_config_errors(prepared):
    with pytest.raises(ConfigError, match="data.name=shards takes data.sequence=random"):
        load_config("pretrain/fashion_mnist", ["data.name=shards", "data.sequence=same_class"])
    with pytest.raises(ConfigError, match="model.in_chans=1 but data.name=shards images are RGB"):
        pretrain(load_config("pretrain/fashion_mnist", [*PRETRAIN_RUN, "data.name=shards",
                                                        f"data.root={prepared['out']}"]))


# ------------------------------------------------------------------------------ training

def shard_run(out, root, *extra):
    return load_config("pretrain/fashion_mnist", [
        *PRETRAIN_RUN, "model.in_chans=3", "data.name=shards", f"data.root={root}",
        "data.shuffle_buffer=8", "data.num_workers=2", "optim.batch_size=4", "optim.epochs=2",
        "model.drop_path_rate=0.1", f"run.output_dir={out}", *extra])


def test_pretraining_on_shards_resumes_mid_epoch_bit_identically(prepared, tmp_path):
    """6 steps per epoch, 2 workers: stopped after step 4 and resumed (mid-epoch, between the
    workers' batches), it ends with the weights of an uninterrupted run."""
    full = pretrain(shard_run(tmp_path / "full", prepared["out"]))
    assert full["step"] == 12
    assert pretrain(shard_run(tmp_path / "part", prepared["out"], "run.max_steps=3"))["step"] == 3
    assert pretrain(shard_run(tmp_path / "part", prepared["out"]))["step"] == 12
    a = ckpt.load_checkpoint(tmp_path / "full" / ckpt.LATEST)
    b = ckpt.load_checkpoint(tmp_path / "part" / ckpt.LATEST)
    assert_same_tensors(a["model"], b["model"], "weights")
    assert logged_losses(tmp_path / "full") == logged_losses(tmp_path / "part")


def test_diagnostics_and_viz_run_on_shards(prepared, tmp_path):
    """A stream has held-out images too: the val shards' first ones (index order) through the
    evaluation transform; viz shows them with ImageNet's mean and std undone."""
    import io
    import torchvision.transforms as T
    from star_mamba.data.build import held_out_images
    from star_mamba.data.transforms import build_eval_transform
    from star_mamba.engine.metrics import read_metrics
    from star_mamba.tools import viz
    cfg = shard_run(tmp_path / "run", prepared["out"], "optim.epochs=1", "run.max_steps=2",
                    "run.diag_every=2", "run.diag_images=4", "data.num_workers=0")
    pretrain(cfg)
    diags = [r["diag"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "diag" in r]
    assert len(diags) == 1 and diags[0]["images"] == 4
    assert diags[0]["paired_gap_mean"] is not None

    model_cfg = cfg.model.star_config()
    held = held_out_images(cfg.data, model_cfg, 4)  # (4, 3, 16, 16)
    index = read_index(str(prepared["out"]), "val")
    samples = [sample for k in range(len(index.shards)) for _, sample in read_shard(index.url(k))]
    photos = [Image.open(io.BytesIO(next(v for e, v in s.items() if e in ("jpg", "png"))))
              .convert("RGB") for s in samples[:4]]
    tf = build_eval_transform(16, cfg.data.crop_pct)
    torch.testing.assert_close(held, torch.stack([tf(im) for im in photos]))
    unnormalised = T.Compose(tf.transforms[:-1])  # the same without Normalize: values in [0, 1]
    torch.testing.assert_close(cfg.data.spec.display(held),
                               torch.stack([unnormalised(im) for im in photos]), atol=1e-6, rtol=0)

    out = viz.visualize(tmp_path / "run" / ckpt.LATEST, tmp_path / "viz", cfg, num_sequences=1,
                        max_batches=1)
    assert (out["data"], out["split"]) == ("shards", "val")
    saved = json.loads((tmp_path / "viz" / "diagnostics.json").read_text())
    assert saved["current"]["images"] > 0 and saved["logged"]  # this run's logged diagnostics
    assert (tmp_path / "viz" / "predictions.png").stat().st_size > 1000


def test_finetune_and_eval_on_shards(prepared, tmp_path):
    common = ["model.name=star_tiny", "model.img_size=16", "model.patch_size=4",
              "model.in_chans=3", "model.embed_dim=16", "model.depth=1", "model.directions=2",
              "data.name=shards", f"data.root={prepared['out']}", "data.num_workers=2",
              "optim.batch_size=4", "optim.epochs=1", "run.pretrained=null", "run.ema_decay=null",
              "run.progress=false", "run.tensorboard=false", "run.threads=1"]
    from star_mamba.tasks.finetune import evaluate_checkpoint, finetune
    result = finetune(load_config("finetune/fashion_mnist", [*common, f"run.output_dir={tmp_path}"]))
    assert result["step"] == 25 // 4
    metrics = evaluate_checkpoint(tmp_path / ckpt.LATEST)
    assert 0 <= metrics["top1"] <= 100  # 8 val images, each counted once:
    assert metrics["top1"] * 8 / 100 == pytest.approx(round(metrics["top1"] * 8 / 100))


def test_torchrun_two_processes_run_the_steps_of_one_process(prepared, tmp_path):
    """25 images in shards of uneven sizes, global batch 8: 3 steps per epoch for 1 process x 8
    and for 2 processes x 4 (2 workers each): every rank the same number of batches, so the
    epoch ends without a rank waiting (a hang would time out)."""
    for nproc, batch, name in ((1, 8, "one"), (2, 4, "two")):
        done = run_cli("pretrain", [*PRETRAIN_RUN, "model.in_chans=3", "data.name=shards",
                                    f"data.root={prepared['out']}", "data.num_workers=2",
                                    "optim.epochs=1", f"optim.batch_size={batch}",
                                    f"run.output_dir={tmp_path / name}"],
                       f"--nproc_per_node={nproc}")
        assert done.returncode == 0, output_of(done)
        assert "3 steps/epoch" in (tmp_path / name / "log.txt").read_text()
    one = ckpt.load_checkpoint(tmp_path / "one" / ckpt.LATEST)["state"]
    two = ckpt.load_checkpoint(tmp_path / "two" / ckpt.LATEST)["state"]
    assert one["step"] == two["step"] == 3 and one["epoch"] == two["epoch"] == 1
    assert len(logged_losses(tmp_path / "one")) == len(logged_losses(tmp_path / "two")) == 3


def test_input_benchmark_runs_and_counts_workers_per_gpu(tmp_path, capsys):
    """A smoke run of `star-mamba bench --data --quick` (24 images): the numbers it reports
    agree with each other (no speed is asserted)."""
    assert main(["bench", "--data", "--quick", "--output-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "input_pipeline.json").read_text())
    folder, shards = r["folder_images_per_s_per_worker"], r["shards_images_per_s_per_worker"]
    assert folder > 0 and shards > 0 and r["ratio"] == pytest.approx(shards / folder, abs=0.02)
    step = r["step"]
    for rate, workers in ((folder, step["workers_per_gpu_folder"]),
                          (shards, step["workers_per_gpu_shards"])):  # the fewest that suffice
        assert (workers - 1) * rate < step["images_per_s"] * 1.001 <= workers * rate * 1.002
    assert r["setup"]["images"] == 24 and "(a) ImageFolder" in capsys.readouterr().out


def test_shards_stream_from_an_http_url(prepared):
    """data.root as a URL: the index and the shards come through webdataset's gopen (curl),
    here from a server on the loopback address serving the prepared directory."""
    import functools
    import http.server
    import shutil
    import threading
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s) URLs with curl, which is not installed")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(prepared["out"]))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = build_shard_set(url, "train", build_pretrain_transform(16), shuffle_buffer=6)
        local = build_shard_set(str(prepared["out"]), "train", build_pretrain_transform(16),
                                shuffle_buffer=6)
        assert remote.index.counts == local.index.counts
        for (a, _), (b, _) in zip(remote.train_loader(4, workers=2, seed=3),
                                  local.train_loader(4, workers=2, seed=3)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        with pytest.raises(ShardError, match="cannot read shard index http://127.0.0.1:"):
            read_index(url, "nosplit")
    finally:
        server.shutdown()
