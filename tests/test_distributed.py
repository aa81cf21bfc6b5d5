"""Multi-process correctness: devices from LOCAL_RANK, per-block seeds that do not depend on the
world size, the EMA on the model's device, one host sync per step, and the torchrun acceptance
test (2 processes x accum 2 == 1 process x accum 4, mixup/cutmix, drop path, EMA, workers)."""
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from star_mamba import checkpoint as ckpt
from star_mamba.tasks import finetune as finetune_module
from star_mamba.engine import trainer
from star_mamba.engine.config import load_config
from star_mamba.engine.dist import resolve_device
from star_mamba.tasks.finetune import finetune
from star_mamba.tasks.pretrain import pretrain
from star_mamba.engine.sampler import (BlockShardSampler, EpochIndexSampler, SeededDataset,
                                       collate_reported)
from star_mamba.seeding import block_seed, mix_seed, sample_seed

from .conftest import (PRETRAIN_RUN, assert_same_tensors, finetune_config, finetune_overrides,
                       make_shapes, output_of, run_cli)


# ------------------------------------------------------------------------------ devices

@pytest.mark.parametrize("name,local_rank,gpus,expected", [
    ("auto", 0, 0, "cpu"),
    ("auto", 3, 0, "cpu"),
    ("cpu", 1, 2, "cpu"),
    ("auto", 1, 2, "cuda:1"),  # torchrun: each process its own GPU
    ("cuda", 0, 1, "cuda:0"),
    ("cuda", 1, 2, "cuda:1"),
    ("cuda:1", 0, 2, "cuda:1"),  # an explicit index is taken as given
])
def test_resolve_device_from_local_rank(name, local_rank, gpus, expected):
    assert resolve_device(name, local_rank, gpus) == torch.device(expected)


@pytest.mark.parametrize("name,local_rank,gpus,message", [
    ("cuda", 0, 0, "no CUDA device is available"),
    ("cuda:0", 0, 0, "no CUDA device is available"),
    ("cuda", 2, 2, r"cuda:2 \(LOCAL_RANK=2\) but this node has 2"),
    ("cuda:4", 0, 2, "this node has 2"),
    ("gpu", 0, 1, "invalid run.device='gpu'"),
])
def test_resolve_device_errors_are_one_clear_value_error(name, local_rank, gpus, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name, local_rank, gpus)


# ------------------------------------------------------------------------------ seeds

def test_block_seeds_follow_the_global_data_order_not_the_world_size():
    one = BlockShardSampler(64, batch_size=4, seed=0)  # 1 process, accum 4
    ranks = [BlockShardSampler(64, batch_size=4, rank=r, world_size=2, seed=0) for r in (0, 1)]
    for epoch in (0, 1):
        # 2 processes with accum 2: global batch i gives rank r the block 2i + r
        two = [block_seed(0, epoch, s.global_block(i)) for i in range(8) for s in ranks]
        assert [block_seed(0, epoch, one.global_block(j)) for j in range(16)] == two
        assert len(set(two)) == 16  # every micro-batch, and so every rank, draws differently
        assert ranks[0].batch_indices(3) + ranks[1].batch_indices(3) == (
            one.batch_indices(6) + one.batch_indices(7))
    assert block_seed(0, 0, 5) != block_seed(0, 1, 5) != block_seed(1, 0, 5)


def test_seed_mixing_has_no_additive_collisions():
    assert mix_seed(0, 1) != mix_seed(1, 0)
    assert block_seed(1, 0, 0) != block_seed(0, 0, 1) != block_seed(0, 1, 0)
    assert block_seed(0, 0, 7) != sample_seed(0, 0, 7)  # the two streams are apart
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(100)}
    assert len(seeds) == 900 and all(0 <= s < 2 ** 63 for s in seeds)


class _Draws(Dataset):
    """Each item: one draw from python's, numpy's and torch's global generators."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor([random.random(), np.random.rand(), torch.rand(()).item()])


def _epoch_batches(num_workers, epoch, start_batch=0):
    sampler = EpochIndexSampler(12, batch_size=3, seed=5)
    sampler.set_epoch(epoch, start_batch)
    loader = DataLoader(SeededDataset(_Draws(), seed=5), batch_size=3, sampler=sampler,
                        num_workers=num_workers, collate_fn=collate_reported)
    return torch.cat([draws for draws, _ in loader])  # (images drawn, 3)


def test_sample_augmentation_depends_on_epoch_and_index_only():
    in_process = _epoch_batches(0, epoch=1)
    assert torch.equal(_epoch_batches(2, epoch=1), in_process)  # whichever worker loads it
    assert torch.equal(_epoch_batches(0, epoch=1, start_batch=2), in_process[6:])  # resume
    assert not torch.equal(_epoch_batches(0, epoch=2), in_process)  # new draws each epoch
    assert len(set(in_process[:, 2].tolist())) == 12  # and each image its own


# ------------------------------------------------------------------------------ fine-tuning

def test_ema_lives_on_the_model_device_and_tracks_the_trained_weights(tmp_path, monkeypatch):
    made = []

    class RecordingEma(finetune_module.ModelEmaV3):
        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            start = {k: v.detach().clone() for k, v in model.state_dict().items()}
            made.append((self, next(model.parameters()).device, start))

    monkeypatch.setattr(finetune_module, "ModelEmaV3", RecordingEma)
    make_shapes(tmp_path / "shapes", per_class=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    finetune(finetune_config(tmp_path / "shapes", tmp_path / "out", "data.num_workers=0",
                             "optim.batch_size=8", "run.max_steps=1", f"run.device={device}"))
    ema, model_device, start = made[0]
    expected = resolve_device(device, 0, torch.cuda.device_count())
    assert model_device == expected  # built from the model after its move
    for p in ema.module.parameters():
        assert p.device == expected and p.dtype == torch.float32
    saved = ckpt.load_checkpoint(tmp_path / "out" / ckpt.LATEST)
    assert saved["state"]["step"] == 1
    decay = 0.5
    for name, trained in saved["model"].items():  # one update: decay * start + (1 - decay) * new
        mixed = decay * start[name].cpu() + (1 - decay) * trained
        torch.testing.assert_close(saved["extras"]["ema"]["module." + name], mixed)


def test_resume_with_workers_augmentation_and_mixup_is_bit_exact(tmp_path):
    make_shapes(tmp_path / "shapes", per_class=4)  # 16 images: 4 steps of 4
    common = ["data.num_workers=2", "optim.batch_size=4", "optim.epochs=2"]
    finetune(finetune_config(tmp_path / "shapes", tmp_path / "full", *common))
    part = finetune_overrides(tmp_path / "shapes", tmp_path / "part", *common)
    assert finetune(load_config("finetune/fashion_mnist", [*part, "run.max_steps=3"]))["step"] == 3
    assert finetune(load_config("finetune/fashion_mnist", part))["step"] == 8
    a = ckpt.load_checkpoint(tmp_path / "full" / ckpt.LATEST)
    b = ckpt.load_checkpoint(tmp_path / "part" / ckpt.LATEST)
    assert_same_tensors(a["model"], b["model"], "weights")
    assert_same_tensors(a["extras"]["ema"], b["extras"]["ema"], "EMA")


# ------------------------------------------------------------------------------ host syncs

def test_one_host_sync_per_optimizer_step(tmp_path, monkeypatch):
    """accum_iter=4, 3 steps, one log line: 3 reads of the finiteness flags and unreadable-image
    counts + 1 loss read (was 12 + 3)."""
    reads = []

    def counting(read):
        def counted(self):
            if sys._getframe(1).f_code.co_filename == trainer.__file__:
                reads.append(read.__name__)
            return read(self)
        return counted

    for read in (torch.Tensor.item, torch.Tensor.tolist):
        monkeypatch.setattr(torch.Tensor, read.__name__, counting(read))
    pretrain(load_config("pretrain/fashion_mnist", [
        *PRETRAIN_RUN, "optim.batch_size=4", "optim.accum_iter=4", "run.max_steps=3",
        "run.log_every=100", f"run.output_dir={tmp_path}"]))
    assert len(reads) == 3 + 1, reads


# ------------------------------------------------------------------------------ torchrun

def _torchrun_finetune(nproc, out, root, accum):
    done = run_cli("finetune", finetune_overrides(
        root, out, "data.num_workers=2", "optim.batch_size=4", f"optim.accum_iter={accum}"),
        f"--nproc_per_node={nproc}")
    assert done.returncode == 0, output_of(done)
    return ckpt.load_checkpoint(Path(out) / ckpt.LATEST)


def test_torchrun_two_processes_accum_2_match_one_process_accum_4(tmp_path):
    """Same global batch (16), same micro-batches, same per-block seeds: RandAugment, random
    erasing, mixup/cutmix and drop path draw the same numbers, so the weights and the EMA agree."""
    make_shapes(tmp_path / "shapes", per_class=8)  # 32 images: 2 steps of 16
    one = _torchrun_finetune(1, tmp_path / "one", tmp_path / "shapes", accum=4)
    two = _torchrun_finetune(2, tmp_path / "two", tmp_path / "shapes", accum=2)
    assert one["state"]["step"] == two["state"]["step"] == 2
    assert_same_tensors(one["model"], two["model"], "weights", rtol=1e-4, atol=1e-6)
    assert_same_tensors(one["extras"]["ema"], two["extras"]["ema"], "EMA", rtol=1e-4, atol=1e-6)
