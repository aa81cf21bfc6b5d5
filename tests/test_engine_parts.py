"""Engine utilities: lr schedule, sampler sharding, checkpoint safety."""
import math
import pickle

import pytest
import torch

from star_mamba import checkpoint as ckpt
from star_mamba.engine.lr_sched import lr_at
from star_mamba.engine.sampler import BlockShardSampler


def test_lr_schedule_warmup_then_half_cosine():
    assert lr_at(0.0, 1.0, 0.1, 2, 10) == 0.0
    assert lr_at(1.0, 1.0, 0.1, 2, 10) == pytest.approx(0.5)
    assert lr_at(2.0, 1.0, 0.1, 2, 10) == pytest.approx(1.0)
    assert lr_at(6.0, 1.0, 0.1, 2, 10) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10.0, 1.0, 0.1, 2, 10) == pytest.approx(0.1)
    values = [lr_at(e / 10, 1.0, 0.0, 2, 10) for e in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warm-up
    assert math.isclose(lr_at(3.0, 2.0, 0.0, 0, 6), 1.0)


def test_poly_schedule_decays_as_a_power_after_warmup():
    assert lr_at(1.0, 1.0, 0.0, 2, 10, "poly") == pytest.approx(0.5)  # warm-up as cosine's
    assert lr_at(6.0, 1.0, 0.0, 2, 10, "poly") == pytest.approx(0.5)  # half way: 1 - 1/2
    assert lr_at(6.0, 1.0, 0.0, 2, 10, "poly", power=2.0) == pytest.approx(0.25)
    assert lr_at(6.0, 1.0, 0.1, 2, 10, "poly") == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10.0, 1.0, 0.1, 2, 10, "poly") == pytest.approx(0.1)
    assert lr_at(6.0, 1.0, 0.0, 2, 10, "poly") != lr_at(7.0, 1.0, 0.0, 2, 10, "poly")


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


def test_auto_resume_takes_the_newest_checkpoint_that_loads(tmp_path, star_log):
    """latest empty, checkpoint-0003 cut in half, 0002 good: auto-resume warns about the two,
    naming each and why, takes 0002 and leaves the damaged files as they are. Exported weights
    are no training checkpoint; with nothing loadable left, auto-resume is an error."""
    from .conftest import truncate

    def save(name, step):
        ckpt.atomic_save(dict(model={"w": torch.full((64,), float(step))}, optimizer={},
                              state={"step": step}, model_config={}), tmp_path / name)

    for step in (1, 2, 3):
        save(f"checkpoint-{step:04d}.pth", step)
    (tmp_path / ckpt.LATEST).write_bytes(b"")
    cut = truncate(tmp_path / "checkpoint-0003.pth")
    path, saved = ckpt.load_resume(tmp_path, "auto")
    assert path == tmp_path / "checkpoint-0002.pth" and saved["state"]["step"] == 2
    warnings = [r.getMessage() for r in star_log.records]
    assert f"cannot load checkpoint {tmp_path / ckpt.LATEST}: the file is empty" in warnings[0]
    assert str(tmp_path / "checkpoint-0003.pth") in warnings[1] and "central directory" in warnings[1]
    assert "resuming from" in warnings[2] and str(path) in warnings[2]
    assert (tmp_path / ckpt.LATEST).read_bytes() == b""
    assert (tmp_path / "checkpoint-0003.pth").read_bytes() == cut
    with pytest.raises(ValueError, match="not a training checkpoint"):
        ckpt.load_resume(tmp_path, str(ckpt.export_safetensors(path, tmp_path / "w.safetensors")))
    for step in (1, 2):
        truncate(tmp_path / f"checkpoint-{step:04d}.pth")
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be resumed .*checkpoint-0001.pth"):
        ckpt.load_resume(tmp_path, "auto")
    assert ckpt.load_resume(tmp_path, "never") is None


def test_resumed_metrics_drop_redone_steps_and_a_torn_row(tmp_path):
    from star_mamba.engine.metrics import MetricWriter, read_metrics
    writer = MetricWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.write(step, dict(loss=step / 10))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # SIGKILL mid-write
    writer.drop_after(3)
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": s, "loss": s / 10} for s in (1, 2, 3)]
