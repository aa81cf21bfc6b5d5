"""Engine utilities: run config parsing, lr schedule, sampler sharding, checkpoint safety."""
import math
import pickle

import pytest
import torch

from star_mamba import checkpoint as ckpt
from star_mamba.engine.config import load_config, resolve_config_path
from star_mamba.engine.lr_sched import lr_at
from star_mamba.engine.sampler import BlockShardSampler


def test_builtin_configs_load_and_overrides_apply():
    cfg = load_config("pretrain/fashion_mnist", ["optim.blr=1e-4", "model.depth=3",
                                                 "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.blr == 1e-4 and cfg.model["depth"] == 3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.name == "fashion_mnist"
    base = load_config("pretrain/star_base_in1k")
    assert base.model["name"] == "star_base" and base.optim.epochs == 1600
    assert resolve_config_path("pretrain/star_base_in1k.yaml").is_file()


@pytest.mark.parametrize("override,message", [
    ("optim.blrr=1", "did you mean 'blr'"),
    ("model.clustr_size=2", "did you mean 'cluster_size'"),
    ("optm.blr=1", "did you mean 'optim'"),
    ("model.name=star_bas", "did you mean 'star_base'"),
    ("optim.blr=abc", "optim.blr='abc': expected a number"),
    ("run.tensorboard=3", "expected true or false"),
    ("blr=1", "section.key=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("pretrain/fashion_mnist", [override])


def test_unknown_config_file():
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_config("pretrain/nope")


def test_lr_schedule_warmup_then_half_cosine():
    assert lr_at(0.0, 1.0, 0.1, 2, 10) == 0.0
    assert lr_at(1.0, 1.0, 0.1, 2, 10) == pytest.approx(0.5)
    assert lr_at(2.0, 1.0, 0.1, 2, 10) == pytest.approx(1.0)
    assert lr_at(6.0, 1.0, 0.1, 2, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10.0, 1.0, 0.1, 2, 10) == pytest.approx(0.1)
    values = [lr_at(e / 10, 1.0, 0.0, 2, 10) for e in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warm-up
    assert math.isclose(lr_at(3.0, 2.0, 0.0, 0, 6), 1.0)


def test_sampler_two_ranks_cover_the_same_global_batches_as_one():
    one = BlockShardSampler(40, batch_size=8, seed=3)
    r0 = BlockShardSampler(40, batch_size=4, rank=0, world_size=2, seed=3)
    r1 = BlockShardSampler(40, batch_size=4, rank=1, world_size=2, seed=3)
    a, b0, b1 = list(one), list(r0), list(r1)
    assert len(a) == 40 and sorted(a) == list(range(40))
    for step in range(5):
        assert a[8 * step: 8 * step + 8] == b0[4 * step: 4 * step + 4] + b1[4 * step: 4 * step + 4]
    one.set_epoch(1)
    epoch1 = list(one)
    assert epoch1 != a  # reshuffled per epoch
    one.set_epoch(1, start_batch=3)
    assert list(one) == epoch1[24:]


def test_sampler_resume_skips_consumed_batches():
    s = BlockShardSampler(50, batch_size=5, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=4)
    assert list(s) == full[20:]
    assert len(s) == 30
    with pytest.raises(ValueError, match="smaller than one global batch"):
        BlockShardSampler(3, batch_size=4)


def test_atomic_save_and_safe_load(tmp_path):
    path = tmp_path / "ck.pth"
    ckpt.atomic_save({"w": torch.ones(2), "step": 3}, path)
    assert ckpt.load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temporary left behind

    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        ckpt.load_checkpoint(bad)


def test_resume_of_another_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.depth: checkpoint 2 vs config 3"):
        ckpt.check_same_model({"depth": 2}, {"depth": 3}, tmp_path / "x.pth")
    assert ckpt.find_resume(tmp_path, "auto") is None
    with pytest.raises(FileNotFoundError, match="run.resume"):
        ckpt.find_resume(tmp_path, str(tmp_path / "missing.pth"))


def test_override_values_are_typed():
    cfg = load_config("pretrain/fashion_mnist", ["optim.lr=1e-4", "run.max_steps=7", "run.max_steps=8",
                                                 "data.root=null", "optim.epochs=3.0"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.run.max_steps == 8 and cfg.data.root is None and cfg.optim.epochs == 3
    with pytest.raises(ValueError, match="optim.epochs=2.5: expected an integer"):
        load_config("pretrain/fashion_mnist", ["optim.epochs=2.5"])
    with pytest.raises(ValueError, match="optim.batch_size=None: a value is required"):
        load_config("pretrain/fashion_mnist", ["optim.batch_size=null"])
