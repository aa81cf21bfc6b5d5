"""Datasets: IDX parsing, Fashion-MNIST loading and errors, ImageFolder transforms, synthetic."""
import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from star_mamba.data import (FashionMNIST, SyntheticImages, build_dataset, build_eval_transform,
                             build_image_folder, build_pretrain_transform)
from star_mamba.data import fashion_mnist as fm
from star_mamba.data.idx import read_idx, write_idx

from .conftest import requires_fashion_mnist


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / f"a{suffix}", array)
    assert np.array_equal(read_idx(tmp_path / f"a{suffix}"), array)


def test_corrupt_idx_names_the_file(tmp_path):
    bad = tmp_path / "bad-magic"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="bad-magic.*magic"):
        read_idx(bad)
    short = tmp_path / "short"
    write_idx(short, np.zeros((4, 4), np.uint8))
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ValueError, match="short.*declares"):
        read_idx(short)
    broken_gz = tmp_path / "x.gz"
    broken_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")[:-6])
    with pytest.raises(ValueError, match="x.gz"):
        read_idx(broken_gz)


def make_fashion_dir(path, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    path.mkdir()
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        img_name, lbl_name = fm.FILES[split]
        write_idx(path / (img_name + ".gz"), images)
        write_idx(path / lbl_name, labels)  # raw and gzip files may be mixed
        data[split] = (images, labels)
    return data


def test_fashion_mnist_from_a_directory(tmp_path):
    data = make_fashion_dir(tmp_path / "fm")
    ds = FashionMNIST(tmp_path / "fm", split="test", img_size=32)
    assert len(ds) == 4
    x, y = ds[1]
    assert x.shape == (1, 32, 32) and y == 1
    zero = (0 - fm.MEAN) / fm.STD
    assert torch.allclose(x[:, :2], torch.full((1, 2, 32), zero))  # symmetric zero padding
    assert torch.allclose(x[:, :, -2:], torch.full((1, 32, 2), zero))
    expected = (torch.from_numpy(data["test"][0][1]).float() / 255 - fm.MEAN) / fm.STD
    torch.testing.assert_close(x[0, 2:30, 2:30], expected)
    rgb = FashionMNIST(tmp_path / "fm", split="train", img_size=28, in_chans=3)
    assert rgb[0][0].shape == (3, 28, 28) and torch.equal(rgb[0][0][0], rgb[0][0][2])


def test_fashion_mnist_in_torchvision_layout(tmp_path):
    make_fashion_dir(tmp_path / "FashionMNIST")
    (tmp_path / "FashionMNIST").rename(tmp_path / "raw")
    (tmp_path / "tv" / "FashionMNIST").mkdir(parents=True)
    (tmp_path / "raw").rename(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert len(FashionMNIST(tmp_path / "tv")) == 6


def test_missing_fashion_mnist_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("STAR_MAMBA_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        FashionMNIST(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_bad_fashion_mnist_arguments(tmp_path):
    make_fashion_dir(tmp_path / "fm")
    with pytest.raises(ValueError, match="img_size=31"):
        FashionMNIST(tmp_path / "fm", img_size=31)
    with pytest.raises(ValueError, match="split 'val'"):
        FashionMNIST(tmp_path / "fm", split="val")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_dataset("mnist")


@requires_fashion_mnist
def test_real_fashion_mnist():
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert set(train.labels.unique().tolist()) == set(range(10))
    pixels = train.images.float() / 255
    assert abs(pixels.mean().item() - fm.MEAN) < 1e-3 and abs(pixels.std().item() - fm.STD) < 1e-3


def test_image_folder_with_the_recipe_transforms(tmp_path):
    for cls, size, mode in (("cat", (300, 200), "RGB"), ("dog", (120, 180), "L")):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new(mode, size, color=40 * i).save(tmp_path / "train" / cls / f"{i}.jpg")
    ds = build_image_folder(tmp_path, "train", build_pretrain_transform(192))
    assert ds.classes == ["cat", "dog"]
    x, y = ds[0]
    assert x.shape == (3, 192, 192) and x.dtype == torch.float32 and y == 0
    assert ds[2][0].shape == (3, 192, 192) and ds[2][1] == 1  # grey converted to RGB
    ev = build_image_folder(tmp_path, "train", build_eval_transform(224))
    assert ev[1][0].shape == (3, 224, 224)
    with pytest.raises(FileNotFoundError, match="val"):
        build_image_folder(tmp_path, "val")


def test_synthetic_images_are_deterministic_per_seed():
    a, b, c = SyntheticImages(8, 16, 3, seed=0), SyntheticImages(8, 16, 3, seed=0), SyntheticImages(8, 16, 3, seed=1)
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == b[5][1]
    assert not torch.equal(a[5][0], c[5][0])
    assert a[0][0].shape == (3, 16, 16)
    assert len({a[i][1] for i in range(8)}) > 1


@pytest.mark.parametrize("op,magnitude", [("PosterizeIncreasing", 10), ("Posterize", 0)])
def test_randaugment_posterize_to_zero_bits_gives_black_image(op, magnitude):
    """ARM's RandAugment (rand-m9-mstd0.5-inc1) asks for 0-bit posterize at magnitude 10, which
    Pillow >= 13 refuses; it must give the black image older Pillow gave, not crash a worker."""
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import AugmentOp
    import star_mamba.data  # noqa: F401  (installs the fix)
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    out = AugmentOp(op, prob=1.0, magnitude=magnitude)(image)
    assert out.size == image.size and out.mode == "RGB"
    assert np.asarray(out).max() == 0
