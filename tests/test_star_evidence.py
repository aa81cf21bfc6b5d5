"""experiments/star_evidence.py end to end at a smoke budget (2 steps per training, probes on a
few hundred images): every phase, the result file's fields, paired statistics, resumption."""
import importlib.util
import json
import math
import statistics
import sys

import pytest
import torch
from torch.utils.data import Subset

from .conftest import ROOT, requires_fashion_mnist


def load_script():
    spec = importlib.util.spec_from_file_location("star_evidence",
                                                  ROOT / "experiments" / "star_evidence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_t_interval_matches_the_student_t_quantile():
    se = load_script()
    mean, lo, hi = se.t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: t(0.975, 2) = 4.3027
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert mean - lo == pytest.approx(hi - mean)
    assert math.isnan(se.t_interval([5.0])[1])


@requires_fashion_mnist
def test_every_phase_at_smoke_budget_and_resume(tmp_path, monkeypatch):
    se = load_script()
    full = se.probe_datasets

    def small(root):
        train, test = full(root)
        return Subset(train, range(300)), Subset(test, range(100))

    monkeypatch.setattr(se, "probe_datasets", small)
    # a smaller model than the experiment's (width 64, 4 blocks): the phases are what is tested
    monkeypatch.setattr(se, "MODEL", ["model.embed_dim=16", "model.depth=2",
                                      "model.decoder_dim=16", "model.decoder_depth=1",
                                      "model.decoder_heads=2"])
    monkeypatch.setattr(se, "DIAG_SEQUENCES", 4)
    monkeypatch.setattr(se, "FINETUNE", [*se.FINETUNE, "data.max_eval_images=64"])
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--arms", "scratch", "arm_k1", "star_k2", "--seeds", "0", "1", "--max-steps", "2",
            "--passes", "1", "--runs", str(runs), "--out", str(out)]
    assert se.main(argv) == 0

    result = json.loads((out / "star_evidence.json").read_text())
    rows = result["runs"]
    assert sorted((r["arm"], r["pretrain_seed"]) for r in rows) == sorted(
        (a, s) for a in ("scratch", "arm_k1", "star_k2") for s in (0, 1))
    for r in rows:
        assert {"arm", "K", "sequence", "separator", "separator_space", "passes", "pretrain_seed",
                "linear_probe_top1", "knn_top1", "finetune_top1"} <= set(r)
        assert r["passes"] == (0 if r["arm"] == "scratch" else 1)
        assert 0 <= r["linear_probe_top1"] <= 100 and 0 <= r["knn_top1"] <= 100
        assert r["finetune_top1"] is not None  # scratch, arm_k1, star_k2 are fine-tuned
        assert r["K"] == {"scratch": 1, "arm_k1": 1, "star_k2": 2}[r["arm"]]
        assert (r["diagnostics"] is None) == (r["arm"] == "scratch")
    star = next(r for r in rows if r["arm"] == "star_k2")
    assert len(star["diagnostics"]["ordered_slot_loss"]["clip"]) == 2
    assert star["diagnostics"]["paired_gap_mean"] is not None

    # paired differences are the per-seed differences, and their mean
    by = {(r["arm"], r["pretrain_seed"]): r for r in rows}
    d = next(x for x in result["paired_differences"]
             if x["metric"] == "knn_top1" and x["arm"] == "star_k2" and x["base"] == "arm_k1")
    expected = [by["star_k2", s]["knn_top1"] - by["arm_k1", s]["knn_top1"] for s in (0, 1)]
    assert d["diffs"] == pytest.approx(expected)
    assert d["mean"] == pytest.approx(statistics.fmean(expected))
    assert "| star_k2 | 1 | 2 | random | identity (pixel) |" in (out / "star_evidence.md").read_text()
    assert (out / "star_evidence.png").stat().st_size > 10_000

    # the scratch arm's backbone is arm_k1's initial weights for the same seed
    src = se.checkpoint_source("scratch", 1, runs, 1)["model"]
    torch.manual_seed(12345)  # the source re-seeds itself: global state must not matter
    again = se.checkpoint_source("scratch", 1, runs, 1)["model"]
    assert all(torch.equal(src[k], again[k]) for k in src)

    # everything is read back: a second call trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*.pth")}
    assert se.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.pth")} == stamps

    # a longer budget and a token-space separator: paired with arm_k1 at the same budget, the
    # earlier rows kept in the report, no fine-tune beyond 1 pass
    budget = ["--arms", "arm_k1", "star_k4_token", "--seeds", "0", "1", "--max-steps", "2",
              "--passes", "3", "--runs", str(runs), "--out", str(out)]
    assert se.main(budget) == 0
    result = json.loads((out / "star_evidence.json").read_text())
    rows = result["runs"]
    assert len(rows) == 6 + 4
    token = [r for r in rows if r["arm"] == "star_k4_token"]
    assert [(r["passes"], r["separator_space"], r["K"]) for r in token] == [(3, "token", 4)] * 2
    assert all(r["finetune_top1"] is None for r in rows if r["passes"] == 3)
    by = {(r["arm"], r["passes"], r["pretrain_seed"]): r for r in rows}
    d = next(x for x in result["paired_differences"] if x["metric"] == "linear_probe_top1"
             and x["arm"] == "star_k4_token" and x["base"] == "arm_k1")
    assert (d["passes"], d["base_passes"]) == (3, 3)
    assert d["diffs"] == pytest.approx([by["star_k4_token", 3, s]["linear_probe_top1"]
                                        - by["arm_k1", 3, s]["linear_probe_top1"] for s in (0, 1)])
    own = next(x for x in result["paired_differences"] if x["metric"] == "knn_top1"
               and x["arm"] == "arm_k1" and x["base"] == "arm_k1")
    assert (own["passes"], own["base_passes"]) == (3, 1)
    assert (runs / "arm_k1" / "passes3" / "seed1" / "pretrain" / "checkpoint-latest.pth").exists()
    assert (out / "star_evidence_budget.png").stat().st_size > 10_000
    md = (out / "star_evidence.md").read_text()  # the same-budget gap table: arm_k1 is the base,
    assert "| 3 | star_k4_token |" in md and "| 3 | arm_k1 |" not in md  # not a row of its own

    # a fresh checkout has only the committed report: its runs are not run again
    fresh = tmp_path / "fresh"
    assert se.main([*budget[:-4], "--runs", str(fresh), "--out", str(out)]) == 0
    assert not list(fresh.rglob("*.pth")) and not list(fresh.rglob("probe.json"))
    again = json.loads((out / "star_evidence.json").read_text())["runs"]
    assert [r["linear_probe_top1"] for r in again] == [r["linear_probe_top1"] for r in rows]


def test_jobs_are_seed_major_and_shards_split_them():
    se = load_script()
    todo = se.jobs([0, 1], [3, 6], list(se.ARMS))
    assert todo[:6] == [(0, 3, "arm_k1"), (0, 3, "star_k4"), (0, 3, "star_k8_embedding"),
                        (0, 3, "star_k4_token"), (0, 6, "arm_k1"), (0, 6, "star_k4")]
    assert len(todo) == 12 and todo[6][0] == 1
    shards = [todo[i::2] for i in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(todo) and not set(shards[0]) & set(shards[1])
    with pytest.raises(Exception, match="expected I/N"):
        se.parse_shard("2/2")
