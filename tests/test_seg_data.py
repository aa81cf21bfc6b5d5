"""Segmentation data: the built-in scenes, ADE20K / mask folders, the joint transforms, and
the data config and build entries that read them."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from star_mamba.config import StarConfig
from star_mamba.data import fashion_mnist as fm
from star_mamba.data.build import classification_sets, pretraining_set, segmentation_sets
from star_mamba.data.config import DataConfig
from star_mamba.data.folder import collect_unreadable
from star_mamba.data.scenes import (SHAPES, SceneDataset, SceneOptions, item_pool, render_scene,
                                    shape_pool)
from star_mamba.data.seg_transforms import SegEvalTransform, SegTrainTransform
from star_mamba.data.segmentation import (ADE20K_CLASSES, SceneSegmentation, build_ade20k,
                                          build_seg_folder)
from star_mamba.errors import ConfigError, DataError, MissingFileError
from star_mamba.seeding import seed_host

from .conftest import requires_fashion_mnist, truncate

SHAPES_OPTS = SceneOptions(source="shapes", canvas=48, items=(3, 5))


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ scenes

def check_scene(scene, canvas: int) -> None:
    """Semantic map = union of instance masks with label + 1, background 0; boxes tight."""
    assert scene.image.shape == scene.semantic.shape == (canvas, canvas)
    assert scene.image.dtype == scene.semantic.dtype == np.uint8
    expected = np.zeros((canvas, canvas), dtype=np.uint8)
    union = np.zeros((canvas, canvas), dtype=bool)
    for inst in scene.instances:
        assert 0 <= inst.label <= 9 and inst.mask.shape == (canvas, canvas)
        assert not (union & inst.mask).any()  # visible masks do not overlap
        union |= inst.mask
        expected[inst.mask] = inst.label + 1
        ys, xs = np.nonzero(inst.mask)
        assert inst.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert inst.mask.sum() >= SceneOptions.min_visible
    np.testing.assert_array_equal(scene.semantic, expected)


def test_scenes_are_deterministic_and_differ_across_indices_and_splits():
    pool = shape_pool("train", SHAPES_OPTS.shapes_per_class)
    a = render_scene(3, 7, SHAPES_OPTS, pool)
    b = render_scene(3, 7, SHAPES_OPTS, pool)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    assert [i.box for i in a.instances] == [i.box for i in b.instances]
    np.random.seed(0); torch.manual_seed(0); random.seed(0)  # global RNGs are not read
    c = render_scene(3, 7, SHAPES_OPTS, pool)
    np.testing.assert_array_equal(a.image, c.image)
    assert not np.array_equal(a.image, render_scene(4, 7, SHAPES_OPTS, pool).image)
    assert not np.array_equal(a.image, render_scene(3, 8, SHAPES_OPTS, pool).image)
    train = SceneDataset(4, "train", seed=7, opts=SHAPES_OPTS)
    test = SceneDataset(4, "test", seed=7, opts=SHAPES_OPTS)
    assert not np.array_equal(train[3].image, test[3].image)
    assert not np.array_equal(train.items.images, test.items.images)  # disjoint pools
    np.testing.assert_array_equal(train[3].image, a.image)


def test_scene_maps_instances_and_boxes_agree():
    ds = SceneDataset(12, "train", seed=1, opts=SHAPES_OPTS)
    kinds = set()
    for i in range(len(ds)):
        scene = ds[i]
        check_scene(scene, SHAPES_OPTS.canvas)
        kinds.update(inst.label for inst in scene.instances)
    assert len(kinds) >= 5  # items of many classes
    assert ds.classes == ("background", *SHAPES) and ds.num_classes == 11
    assert ds.source == "shapes"


def test_background_overlaps_item_intensities():
    """A threshold alone does not segment: background pixels reach above item pixels' low end."""
    scene = SceneDataset(1, seed=2, opts=SHAPES_OPTS)[0]
    back, items = scene.image[scene.semantic == 0], scene.image[scene.semantic > 0]
    assert back.max() > np.percentile(items, 25)
    assert back.min() < items.min() + 60


def test_later_items_occlude_earlier_ones():
    """A pool of one item (a solid 20 px square), two copies per scene: where the second, drawn
    on top, overlaps the first, the first's visible mask has a hole of exactly its pixels."""
    square = np.zeros((1, 28, 28), dtype=np.uint8)
    square[0, 4:24, 4:24] = 200
    pool = shape_pool("train", 1)
    pool = type(pool)(square, np.array([3]), pool.classes, "shapes")
    opts = SceneOptions(source="shapes", canvas=40, items=(2, 2), scale=(1.0, 1.0), min_visible=1)
    occluded = 0
    for index in range(60):
        scene = render_scene(index, 0, opts, pool)
        check_scene(scene, 40)
        if len(scene.instances) != 2:
            continue
        first, second = scene.instances
        x0, y0, x1, y1 = map(int, first.box)
        if (x1 - x0, y1 - y0) != (20, 20) or first.mask.sum() == 400:
            continue  # the first square is cut by the canvas, or not occluded
        hole = np.zeros_like(first.mask)
        hole[y0:y1, x0:x1] = ~first.mask[y0:y1, x0:x1]
        assert hole.any() and (second.mask[hole]).all()
        assert (scene.semantic[hole] == 4).all() and scene.image[hole].min() > 100
        occluded += 1
    assert occluded >= 3, f"only {occluded} of 60 scenes had an occluded, uncut first square"


def test_scene_drops_tiny_instances_and_does_not_draw_them():
    opts = SceneOptions(source="shapes", canvas=32, items=(4, 4), min_visible=300)
    scene = render_scene(0, 0, opts, shape_pool("train", opts.shapes_per_class))
    check_scene(scene, 32)
    assert all(i.mask.sum() >= 300 for i in scene.instances)


def test_shapes_source_works_without_fashion_mnist(tmp_path, monkeypatch, star_log):
    monkeypatch.delenv("STAR_MAMBA_DATA", raising=False)
    monkeypatch.setattr(fm, "candidate_dirs", lambda root=None: [tmp_path / "nowhere"])
    ds = SceneDataset(2, opts=SceneOptions(source="auto", canvas=32))
    assert ds.source == "shapes" and ds.classes[1] == "disc"
    check_scene(ds[0], 32)
    with pytest.raises(MissingFileError):
        SceneDataset(2, opts=SceneOptions(source="fashion_mnist"))


@requires_fashion_mnist
def test_fashion_mnist_scenes_use_the_split_items():
    train = item_pool("fashion_mnist", "train")
    test = item_pool("fashion_mnist", "test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert item_pool("fashion_mnist", "train") is train  # cached once per process
    ds = SceneDataset(3, opts=SceneOptions(source="fashion_mnist"))
    assert ds.classes == ("background", *fm.CLASSES)
    check_scene(ds[0], 64)


def test_scene_rendering_is_fast():
    import time
    ds = SceneDataset(50, opts=SceneOptions(source="shapes"))
    ds[0]
    start = time.perf_counter()
    for i in range(50):
        ds[i]
    assert (time.perf_counter() - start) / 50 < 0.005  # well under 5 ms per 64 px scene


def test_scene_options_are_checked():
    for bad in (dict(items=(3, 2)), dict(scale=(0, 1)), dict(source="mnist"), dict(canvas=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SceneOptions(**bad)


# ------------------------------------------------------------------------------ files

def write_image(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def make_ade(root: Path, n: int = 3, size=(12, 10), grey_first: bool = True) -> Path:
    """A tiny ADEChallengeData2016 (training + validation); mask of pair i holds 0, 1, 150, 255
    and i + 2 in known places."""
    rng = np.random.default_rng(0)
    h, w = size
    for split in ("training", "validation"):
        for i in range(n):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = pixels[..., 0] if grey_first and i == 0 else pixels
            write_image(root / "images" / split / f"ADE_{i:03d}.jpg", image, quality=95)
            mask = np.full((h, w), i + 2, dtype=np.uint8)
            mask[0, 0], mask[0, 1], mask[0, 2], mask[0, 3] = 0, 1, 150, 255
            write_image(root / "annotations" / split / f"ADE_{i:03d}.png", mask)
    return root


def test_ade20k_labels_and_grey_images(tmp_path):
    ds = build_ade20k(make_ade(tmp_path), "training")
    assert len(ds) == 3 and len(ds.classes) == 150 == len(ADE20K_CLASSES)
    assert ds.classes[:5] == ("wall", "building", "sky", "floor", "tree")
    image, mask = ds[0]
    assert image.mode == "RGB" and image.size == (10, 12)  # a grey JPEG read as RGB
    assert mask.dtype == np.uint8 and mask.shape == (12, 10)
    assert mask[0, :4].tolist() == [255, 0, 149, 255]  # 0 -> ignore, 1 -> 0, 150 -> 149
    assert mask[1, 0] == 1  # label 2 -> 1
    assert len(build_ade20k(tmp_path, "val")) == 3  # alias of validation


def test_ade20k_through_the_eval_transform_keeps_the_mask_size(tmp_path):
    tf = SegEvalTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), base_scale=(40, 20))
    x, y = build_ade20k(make_ade(tmp_path), "validation", transform=tf)[1]
    assert x.shape == (3, 24, 20) and x.dtype == torch.float32  # 12x10 fit to (40, 20): x2
    assert y.shape == (12, 10) and y.dtype == torch.int64
    assert y[0, :4].tolist() == [255, 0, 149, 255]


def test_ade20k_unmatched_files_are_one_warning(tmp_path, star_log):
    root = make_ade(tmp_path)
    write_image(root / "images" / "training" / "extra.jpg", np.zeros((4, 4, 3), np.uint8))
    write_image(root / "images" / "training" / "extra2.jpg", np.zeros((4, 4, 3), np.uint8))
    assert len(build_ade20k(root, "training")) == 3
    lines = [r.getMessage() for r in star_log.records if "without a match" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 images") and "extra.jpg" in lines[0]


def test_ade20k_missing_directory(tmp_path):
    with pytest.raises(MissingFileError, match="annotations") as e:
        (tmp_path / "images" / "training").mkdir(parents=True)
        build_ade20k(tmp_path, "training")
    assert "ADEChallengeData2016" in one_line(e)


def test_broken_image_or_mask_is_skipped_named_and_collected(tmp_path, star_log):
    root = make_ade(tmp_path)
    truncate(root / "images" / "training" / "ADE_001.jpg")
    (root / "annotations" / "training" / "ADE_002.png").write_bytes(b"not a png")
    ds = build_ade20k(root, "training", max_bad_fraction=1.0)
    image, mask = ds[1]  # ADE_001 broken, ADE_002's mask broken: wraps to ADE_000
    np.testing.assert_array_equal(mask, ds[0][1])
    messages = " ".join(r.getMessage() for r in star_log.records)
    assert "ADE_001.jpg" in messages and "ADE_002.png" in messages
    fresh = build_ade20k(root, "training")
    with collect_unreadable() as reports:
        fresh[1]
        fresh[2]
        fresh[0]
    assert [(i, Path(p).name) for i, p, _ in reports] == [(1, "ADE_001.jpg"), (2, "ADE_002.jpg")]
    assert "ADE_002.png" in reports[1][2]  # the reason names the mask


def test_mask_size_mismatch_and_bad_labels_are_data_errors(tmp_path):
    root = make_ade(tmp_path)
    write_image(root / "annotations" / "training" / "ADE_001.png", np.ones((5, 5), np.uint8))
    bad = np.full((12, 10), 3, dtype=np.uint8)
    bad[2, 2], bad[3, 3] = 151, 200
    write_image(root / "annotations" / "training" / "ADE_002.png", bad)
    ds = build_ade20k(root, "training")
    with pytest.raises(DataError, match="ADE_001.png is 5x5 but its image") as e:
        ds[1]
    one_line(e)
    with pytest.raises(DataError, match=r"ADE_002.png holds labels 151, 200 outside 0..150"):
        ds[2]
    write_image(root / "annotations" / "training" / "ADE_000.png",
                np.zeros((12, 10, 3), np.uint8))
    with pytest.raises(DataError, match="ADE_000.png is a RGB image"):
        ds[0]


def make_seg_folder(root: Path, classes=("sky", "road", "car")) -> Path:
    for split in ("train", "val"):
        for i in range(2):
            write_image(root / "images" / split / f"{i}.png", np.full((6, 8, 3), 40 * i, np.uint8))
            mask = np.zeros((6, 8), dtype=np.uint8)
            mask[:, 4:] = 2
            mask[0, 0] = 255
            palette = Image.fromarray(mask, mode="P")
            palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (253 * 3))
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            palette.save(root / "masks" / split / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_seg_folder_reads_palette_masks_and_classes(tmp_path):
    ds = build_seg_folder(make_seg_folder(tmp_path), "val")
    assert ds.classes == ("sky", "road", "car") and len(ds) == 2
    image, mask = ds[1]
    assert image.size == (8, 6) and mask[0, 0] == 255 and mask[0, 5] == 2 and mask[1, 1] == 0
    (tmp_path / "classes.txt").write_text("sky\nroad\n")  # label 2 is now out of range
    with pytest.raises(DataError, match="labels 2 outside 0..1"):
        build_seg_folder(tmp_path, "val")[0]
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(MissingFileError, match="classes.txt is missing") as e:
        build_seg_folder(tmp_path, "val")
    one_line(e)


# ------------------------------------------------------------------------------ transforms

def stripes(h: int, w: int) -> tuple[Image.Image, np.ndarray]:
    """An asymmetric pattern: column j of the image is 10 * j (grey) and of the mask j % 3."""
    cols = np.arange(w)
    image = np.tile((cols * 10 % 256).astype(np.uint8), (h, 1))
    return Image.fromarray(image, mode="L"), np.tile((cols % 3).astype(np.uint8), (h, 1))


def test_train_transform_shapes_and_padding():
    image, mask = stripes(10, 14)
    tf = SegTrainTransform(24, None, (1.0, 1.0), cat_max_ratio=1.0, flip_prob=0.0,
                           photometric=False, mean=(0.0,), std=(1.0,))
    x, y = tf(image, mask)
    assert x.shape == (1, 24, 24) and y.shape == (24, 24) and y.dtype == torch.int64
    assert (y[10:] == 255).all() and (y[:, 14:] == 255).all()
    assert (x[:, 10:] == 0).all() and (x[:, :, 14:] == 0).all()
    np.testing.assert_array_equal(y[:10, :14].numpy(), mask)
    np.testing.assert_allclose(x[0, :10, :14].numpy(), np.asarray(image) / 255.0, atol=1e-6)
    rgb = SegTrainTransform(8, (32, 16), mean=(0.5,) * 3, std=(0.2,) * 3)
    seed_host(3)
    x, y = rgb(Image.fromarray(np.zeros((20, 30, 3), np.uint8)), np.zeros((20, 30), np.uint8))
    assert x.shape == (3, 8, 8) and y.shape == (8, 8)


def test_flip_flips_image_and_mask_together():
    image, mask = stripes(6, 9)
    tf = SegTrainTransform(9, None, (1.0, 1.0), cat_max_ratio=1.0, flip_prob=1.0,
                           photometric=False, mean=(0.0,), std=(1.0,))
    x, y = tf(image, mask)
    np.testing.assert_array_equal(y[:6].numpy(), mask[:, ::-1])  # rows 6..8: padding
    np.testing.assert_allclose(x[0, :6].numpy(), np.asarray(image)[:, ::-1] / 255.0, atol=1e-6)
    assert not np.array_equal(mask, mask[:, ::-1])


def test_cat_max_ratio_is_respected_when_possible():
    """Columns 0..39 class 0, 40..79 class 1: a 40 px crop keeps both classes under 75 % only
    at offsets 11..29 (19 of 41). With the check every seeded crop does; without, many do not."""
    mask = np.zeros((40, 80), dtype=np.uint8)
    mask[:, 40:] = 1
    image = Image.fromarray(np.zeros((40, 80), np.uint8), mode="L")

    def shares(cat_max_ratio):
        tf = SegTrainTransform(40, None, (1.0, 1.0), cat_max_ratio=cat_max_ratio, flip_prob=0.0,
                               photometric=False)
        out = []
        for seed in range(20):
            seed_host(seed)
            _, y = tf(image, mask)
            out.append(max((y == 0).float().mean().item(), (y == 1).float().mean().item()))
        return out

    assert all(s < 0.75 for s in shares(0.75))
    assert sum(s >= 0.75 for s in shares(1.0)) >= 5


def test_train_transform_is_reproducible_from_the_host_seed():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    mask = rng.integers(0, 5, (30, 40)).astype(np.uint8)
    tf = SegTrainTransform(16, (48, 24), mean=(0.5,) * 3, std=(0.25,) * 3)
    seed_host(11)
    a = tf(image, mask)
    seed_host(11)
    b = tf(image, mask)
    seed_host(12)
    c = tf(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_eval_transform_keeps_the_mask_at_original_size():
    image, mask = stripes(10, 20)
    x, y = SegEvalTransform((0.0,), (1.0,), base_scale=(40, 30))(image, mask)
    assert x.shape == (1, 20, 40) and y.shape == (10, 20)  # long side 40 binds (factor 2)
    np.testing.assert_array_equal(y.numpy(), mask)
    x, _ = SegEvalTransform((0.0,), (1.0,))(image, mask)
    assert x.shape == (1, 10, 20)


def test_scene_segmentation_items():
    ds = SceneSegmentation(SceneDataset(2, opts=SHAPES_OPTS),
                           SegEvalTransform((fm.MEAN,), (fm.STD,)))
    x, y = ds[0]
    assert x.shape == (1, 48, 48) and y.shape == (48, 48)
    assert set(y.unique().tolist()) <= set(range(11)) and ds.classes[0] == "background"


# ------------------------------------------------------------------------------ config, build

def test_config_rejects_bad_segmentation_fields():
    cases = {"scene_items": (3, 2), "seg_ratio": (2.0, 1.0), "scene_scale": (0.0, 1.0),
             "cat_max_ratio": 0.0, "hflip": 2.0, "ignore_index": 256, "scene_images": 0,
             "seg_base_scale": (0, 512)}
    for field, value in cases.items():
        with pytest.raises(ConfigError, match=f"data.{field}") as e:
            DataConfig(name="scenes", **{field: value})
        one_line(e)
    with pytest.raises(ConfigError, match="segmentation dataset"):
        DataConfig(name="ade20k", sequence="views")
    for name in ("scenes", "ade20k", "seg_folder"):
        DataConfig(name=name)  # the default data.sequence=random is accepted


def test_classification_and_pretraining_refuse_segmentation_data():
    model = StarConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2)
    with pytest.raises(ConfigError, match="star-mamba segment") as e:
        classification_sets(DataConfig(name="scenes"), model)
    one_line(e)
    with pytest.raises(ConfigError, match="star-mamba segment"):
        pretraining_set(DataConfig(name="scenes"), model, 0)


def test_segmentation_sets(tmp_path):
    data = DataConfig(name="scenes", scene_source="shapes", scene_canvas=32, scene_images=20,
                      max_images=5, max_eval_images=3)
    train, evals, classes = segmentation_sets(data, crop_size=24, in_chans=1, seed=4)
    assert len(train) == 5 and len(evals) == 3 and classes == ("background", *SHAPES)
    seed_host(0)
    x, y = train[0]
    assert x.shape == (1, 24, 24) and y.shape == (24, 24)
    x, y = evals[0]
    assert x.shape == (1, 32, 32) and y.shape == (32, 32)
    other = segmentation_sets(data, 24, 1, seed=5, train=False)
    assert other[0] is None and torch.equal(other[1][0][0], x)  # eval scenes ignore the seed
    with pytest.raises(ConfigError, match="model.in_chans=3") as e:
        segmentation_sets(data, 24, 3, 0)
    one_line(e)
    with pytest.raises(ConfigError, match="data.root is required"):
        segmentation_sets(DataConfig(name="ade20k"), 24, 3, 0)
    ade = DataConfig(name="ade20k", root=str(make_ade(tmp_path / "ade")), seg_base_scale=(32, 16))
    train, evals, classes = segmentation_sets(ade, 8, 3, 0)
    assert len(train) == len(evals) == 3 and len(classes) == 150
    assert evals[0][1].shape == (12, 10) and train[0][0].shape == (3, 8, 8)
    folder = DataConfig(name="seg_folder", root=str(make_seg_folder(tmp_path / "f")),
                        reduce_zero_label=True)
    _, evals, classes = segmentation_sets(folder, 8, 3, 0, train=False)
    assert classes == ("sky", "road", "car")
    assert evals[0][1][0, 5] == 1 and evals[0][1][1, 1] == 255  # 2 -> 1, 0 -> ignore
