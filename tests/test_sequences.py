"""Sequence datasets (data/sequences.py, data/moving.py): items are whole sequences of K images."""
import math

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

import star_mamba
from star_mamba.data import SyntheticImages, build_image_folder
from star_mamba.data.fashion_mnist import MEAN, STD
from star_mamba.data.moving import MovingFashionClips
from star_mamba.data.sequences import (SEQUENCE_KINDS, RandomSequences, ReportedSequences,
                                       SameClassSequences, ViewSequences, build_sequence_dataset,
                                       collate_sequences, collate_sequences_reported)
from star_mamba.engine.sampler import EpochIndexSampler, SeededDataset, collate_reported

K = 2


class NoisyBase(Dataset):
    """SyntheticImages plus noise from the global RNG: an augmentation the pipeline must seed."""

    def __init__(self, n=24, size=16, chans=1):
        self.images = SyntheticImages(n, size, chans, seed=1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x, y = self.images[i]
        return x + 0.1 * torch.rand(x.shape), y


class ColourBase(Dataset):
    """(2, 12, 10) images: channel 0 a constant unique to the image, channel 1 a texture."""

    def __init__(self, n=6):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.stack([torch.full((12, 10), 0.1 * (i + 1)), torch.rand(12, 10, generator=g)]), i % 3


class SpriteBase(Dataset):
    """(1, 28, 28) items in [0, 1]: an asymmetric block of random size and texture."""

    def __init__(self, n=5):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(100 + i)
        x = torch.zeros(1, 28, 28)
        h, w = torch.randint(8, 20, (2,), generator=g).tolist()
        x[0, 3:3 + h, 5:5 + w] = 0.3 + 0.7 * torch.rand(h, w, generator=g)
        return x, i


class FashionLike(Dataset):
    """Raw ``images`` (N, 28, 28) uint8 and ``labels``, as FashionMNIST keeps them."""

    def __init__(self, n=8):
        self.images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(0))
        self.labels = torch.arange(n) % 4

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        raise AssertionError("clips must read the raw images, not the padded items")


def make(kind, **options):
    """A tiny dataset of each kind at 16 px, 1 channel."""
    base = SpriteBase(8) if kind == "clip" else SyntheticImages(40, 16, 1, seed=2)
    return build_sequence_dataset(kind, base, K, 16, 1, seed=5, **options)


@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_shapes_dtypes_and_collate(kind):
    ds = make(kind)
    assert len(ds) == (8 if kind == "clip" else 40) // K
    frames, labels = ds[(1, 3)]
    assert frames.shape == (K, 1, 16, 16) and frames.dtype == torch.float32
    assert labels.shape == (K,) and labels.dtype == torch.int64
    assert torch.isfinite(frames).all()
    images, flat = collate_sequences([ds[(0, i)] for i in range(3)])
    assert images.shape == (3 * K, 1, 16, 16) and flat.shape == (3 * K,) and flat.dtype == torch.int64
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_collate_order():
    batch = [(torch.stack([torch.full((1, 2, 2), 10.0 * b + k) for k in range(K)]),
              torch.arange(K) + 10 * b) for b in range(3)]
    images, labels = collate_sequences(batch)
    for b in range(3):
        for k in range(K):
            assert torch.equal(images[b * K + k], batch[b][0][k])
            assert labels[b * K + k] == 10 * b + k


@pytest.mark.parametrize("world", [1, 2])
def test_random_reproduces_the_image_level_pipeline(world):
    """Same images, augmentations and labels in the same places as today's path (image sampler,
    SeededDataset, K consecutive images per sequence), for every rank and epoch."""
    base, seed, b = NoisyBase(24), 7, 4  # 4 images per rank and step = 2 sequences
    for epoch in (0, 1):
        for rank in range(world):
            old_sampler = EpochIndexSampler(len(base), b, rank, world, seed)
            old_sampler.set_epoch(epoch)
            old = list(DataLoader(SeededDataset(base, seed), batch_size=b, sampler=old_sampler,
                                  collate_fn=collate_reported))
            seqs = ReportedSequences(RandomSequences(base, K, seed))
            new_sampler = EpochIndexSampler(len(seqs), b // K, rank, world, seed, shuffle=False)
            new_sampler.set_epoch(epoch)
            new = list(DataLoader(seqs, batch_size=b // K, sampler=new_sampler,
                                  collate_fn=collate_sequences_reported))
            assert len(old) == len(new) == len(base) // (b * world)
            for ((old_x, old_y), _), ((new_x, new_y), reports) in zip(old, new):
                assert torch.equal(old_x, new_x) and torch.equal(old_y, new_y) and reports == []


def test_same_class():
    base = SyntheticImages(40, 16, 1, seed=2)
    ds = SameClassSequences(base, 3, seed=1, img_size=16, in_chans=1)
    labels_of_base = torch.tensor([base[i][1] for i in range(len(base))])
    seen = set()
    for index in range(len(ds)):
        frames, labels = ds[(2, index)]
        members = ds.images_of((2, index))
        assert len(set(members)) == 3  # distinct images ...
        assert (labels == labels[0]).all() and (labels_of_base[members] == labels[0]).all()  # ... of one class
        for a in range(3):
            for c in range(a + 1, 3):
                assert not torch.equal(frames[a], frames[c])
        seen.add(int(labels[0]))
    assert len(seen) > 1  # the class is drawn per sequence
    assert torch.equal(ds[(2, 4)][0], SameClassSequences(base, 3, seed=1)[(2, 4)][0])
    assert ds.images_of((2, 4)) != ds.images_of((3, 4)) or ds.images_of((2, 5)) != ds.images_of((3, 5))
    with pytest.raises(ValueError, match="no class holds"):
        SameClassSequences(SyntheticImages(4, 16, 1), 3)


def test_views_come_from_one_image_and_differ():
    base = ColourBase(6)
    ds = ViewSequences(base, 4, img_size=8, seed=0, num_sequences=6, in_chans=2)
    sources = []
    for index in range(len(ds)):
        frames, labels = ds[(1, index)]
        assert frames.shape == (4, 2, 8, 8)
        source = ds.source_of((1, index))
        sources.append(source)
        # the constant colour channel identifies the source image in every crop
        assert torch.allclose(frames[:, 0], torch.full((4, 8, 8), 0.1 * (source + 1)), atol=1e-6)
        assert (labels == source % 3).all()
        for a in range(4):
            for c in range(a + 1, 4):
                assert not torch.allclose(frames[a, 1], frames[c, 1], atol=1e-3)  # different crops
    assert sorted(sources) == list(range(6))  # a permutation of the sources per epoch
    assert [ds.source_of((2, i)) for i in range(6)] != sources
    assert torch.equal(ds[(1, 2)][0], ViewSequences(base, 4, 8, 0, 6, 2)[(1, 2)][0])
    # scale (1, 1) with ratio 1 on a square image and no flips: the image itself
    full = ViewSequences(SyntheticImages(4, 16, 1), 2, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                         flip_prob=0.0)
    assert torch.allclose(full[0][0][0], SyntheticImages(4, 16, 1)[full.source_of(0)][0])


def centre_of_mass(frame):
    """(y, x) centre of mass of a (H, W) non-negative image."""
    h, w = frame.shape
    mass = frame.sum()
    ys = torch.arange(h, dtype=torch.float64)
    xs = torch.arange(w, dtype=torch.float64)
    f = frame.double()
    return torch.stack([(f.sum(1) * ys).sum() / mass, (f.sum(0) * xs).sum() / mass])


def test_clip_moves_with_its_velocity_and_bounces():
    base = SpriteBase(5)
    ds = MovingFashionClips.from_dataset(base, 8, img_size=48, in_chans=1, seed=3,
                                         num_sequences=6, canvas_size=48, num_items=1,
                                         speed=(5.0, 6.0))
    bounces = 0
    for index in range(len(ds)):
        frames, labels = ds[index]
        clip = ds.clip(index)
        pixels = frames[:, 0] * STD + MEAN  # back to [0, 1]
        assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
        sprite = clip["sprites"][0]
        assert (labels == clip["labels"][0]).all()
        com = torch.stack([centre_of_mass(p.clamp_min(0)) for p in pixels])  # (K, 2)
        pos, vel = clip["positions"][:, 0], clip["velocities"][:, 0]
        sprite_com = centre_of_mass(sprite)
        assert torch.allclose(com, pos + sprite_com, atol=1e-3)  # sub-pixel exact
        assert 5.0 <= float(vel[0].norm()) <= 6.0
        limit = 48 - 28
        for t in range(7):
            for a in (0, 1):
                step = float(com[t + 1, a] - com[t, a])
                free = float(pos[t, a] + vel[t, a])
                if 0 <= free <= limit:  # translated by the velocity
                    assert math.isclose(step, float(vel[t, a]), abs_tol=1e-3)
                    assert float(vel[t + 1, a]) == float(vel[t, a])
                else:  # reflected at the border: mirrored position, velocity flipped
                    bounces += 1
                    mirrored = -free if free < 0 else 2 * limit - free
                    assert math.isclose(float(pos[t + 1, a]), mirrored, abs_tol=1e-9)
                    assert float(vel[t + 1, a]) == -float(vel[t, a])
                    assert math.isclose(float(com[t + 1, a]), mirrored + float(sprite_com[a]),
                                        abs_tol=1e-3)  # seen in the frames too
    assert bounces > 0
    # deterministic for (seed, index), epoch-independent by default, different elsewhere
    again = MovingFashionClips.from_dataset(base, 8, 48, 1, 3, num_sequences=6, canvas_size=48,
                                            num_items=1, speed=(5.0, 6.0))
    assert torch.equal(ds[2][0], again[(5, 2)][0])
    assert not torch.equal(ds[2][0], ds[3][0])
    other_seed = MovingFashionClips.from_dataset(base, 8, 48, 1, 4, num_sequences=6,
                                                 canvas_size=48, num_items=1, speed=(5.0, 6.0))
    assert not torch.equal(ds[2][0], other_seed[2][0])
    per_epoch = MovingFashionClips.from_dataset(base, 8, 48, 1, 3, num_sequences=6, canvas_size=48,
                                                per_epoch=True)
    assert not torch.equal(per_epoch[(0, 2)][0], per_epoch[(1, 2)][0])


def test_clip_resized_normalised_channels_and_two_items():
    ds = build_sequence_dataset("clip", SpriteBase(5), 4, 16, 3, seed=0, num_sequences=10,
                                num_items=2)
    frames, labels = ds[0]
    assert frames.shape == (4, 3, 16, 16) and frames.dtype == torch.float32
    assert torch.equal(frames[:, 0], frames[:, 1]) and torch.equal(frames[:, 0], frames[:, 2])
    assert math.isclose(float(frames.min()), -MEAN / STD, abs_tol=1e-5)  # background as padding
    assert len(ds.clip(0)["items"]) == 2
    assert len(ds) == 10


def test_clip_reads_raw_fashion_items_through_subset():
    raw = FashionLike(8)
    ds = MovingFashionClips.from_dataset(Subset(raw, [5, 6, 7]), 2, 32, 1, seed=0)
    assert len(ds) == 1
    clip = ds.clip(0)
    for item, sprite, label in zip(clip["items"], clip["sprites"], clip["labels"]):
        assert torch.equal(sprite, raw.images[5 + item].float() / 255)
        assert label == int(raw.labels[5 + item])
    assert ds[0][0].shape == (2, 1, 32, 32)


@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_deterministic_across_workers(kind):
    ds = make(kind)

    def load(workers):
        sampler = EpochIndexSampler(len(ds), 2, seed=9)
        sampler.set_epoch(1)
        torch.manual_seed(workers)  # the global RNG state must not matter
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers,
                            collate_fn=collate_sequences)
        return [batch for _, batch in zip(range(3), loader)]

    for (a_x, a_y), (b_x, b_y) in zip(load(0), load(2)):
        assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)


def test_unknown_kind_and_option():
    base = SyntheticImages(8, 16, 1)
    with pytest.raises(ValueError, match="unknown sequence kind 'video'.*random, same_class, views, clip"):
        build_sequence_dataset("video", base, K, 16, 1)
    with pytest.raises(ValueError, match="'random' takes no option.*scale"):
        build_sequence_dataset("random", base, K, 16, 1, scale=(0.5, 1.0))
    assert len(build_sequence_dataset("random", base, K, 16, 1, scale=None)) == 4  # None: ignored
    with pytest.raises(ValueError, match="canvas_size=32"):
        build_sequence_dataset("clip", SyntheticImages(4, 32, 1), K, 16, 1, canvas_size=32)
    with pytest.raises(ValueError, match="expected \\(3, 16, 16\\)"):
        build_sequence_dataset("random", base, K, 16, 3)[0]


def test_unreadable_images_are_reported(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "train" / c / f"{i}.png")
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not an image")
    from torchvision import transforms as T
    base = build_image_folder(tmp_path, transform=T.ToTensor())
    ds = ReportedSequences(build_sequence_dataset("random", base, K, 16, 3, seed=0))
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate_sequences_reported))
    (images, labels), reports = batches[0]
    assert images.shape == (6, 3, 16, 16)
    assert [(i, p.endswith("a/1.png")) for i, p, _ in reports] == [(1, True)]


def test_pretrain_forward_on_each_kind():
    model = star_mamba.create_pretrain_model(
        "star_tiny", img_size=16, patch_size=4, in_chans=1, cluster_size=2, embed_dim=32, depth=2,
        decoder_dim=32, decoder_depth=2, decoder_heads=2, images_per_sequence=K)
    for kind in SEQUENCE_KINDS:
        ds = make(kind)
        images, labels = collate_sequences([ds[(0, i)] for i in range(3)])
        out = model(images)
        assert out.pred.shape[0] == 3 and out.pred.shape == out.target.shape
        assert torch.isfinite(out.loss)
