"""Evidence v2: does STAR pretraining help on Fashion-MNIST, and when?

Arms (one small model; each arm pretrained once per seed and budget):

  scratch             no pretraining: the randomly initialised backbone (seeded like the others)
  arm_k1              ARM-style: K = 1 image per sequence, no separator
  star_k2             STAR, K = 2 random images per sequence, identity separators before each (SC)
  star_k4             STAR, K = 4 random images per sequence (the paper's setting)
  star_k4_clip        STAR, K = 4 consecutive frames of a moving-Fashion-MNIST clip
  star_k4_same_class  STAR, K = 4 images of one class
  star_k8_embedding   STAR, K = 8, learned-embedding separators (the name of a checkpoint in the
                      first author's ARM fork, ``img8_embed_200p``, reads that way)
  star_k4_token       STAR, K = 4, identity separators written in token space (D-dimensional
                      vectors, no patch embedding: ``model.separator_space=token``)

Budgets (``--passes``), in passes over the 60,000 training images: every arm at 1 pass;
arm_k1 and star_k4 also at 3 and 6 passes, star_k8_embedding and star_k4_token at 3 (``GRID``).
Fine-tuning (step 3) is done at 1 pass only.

Pairing: seed s means the same initial weights (``run.seed``) and, for the random-sequence arms,
the same images in the same steps (the batch is counted in images: 64 per step for every K).

Each run (arm, passes, seed), resumable step by step (a finished step is read back from its JSON
file); the runs are taken seed by seed, each through all its steps before the next:
  1. pretrain   ``runs/star_evidence/<arm>[/passes<P>]/seed<s>/pretrain/`` (no ``passes<P>`` for
                1 pass; the engine resumes mid-epoch)
  2. probe      converged linear probe (L-BFGS logistic regression, weight-decay sweep on a
                held-out 10% of the training set) and 20-NN on frozen features of all 60,000
                training and 10,000 test images (``tasks/linprobe.py``) -> ``probe.json``
  3. finetune   a short fine-tune of the main arms (scratch, arm_k1, star_k2, star_k4) ->
                ``finetune/result.json``
  4. diag       cross-image diagnostics of the final checkpoint on held-out test sequences
                (``evaluation/diagnostics.py``): loss per image slot, paired slot gap, decoder
                attention share on the current image -> ``diag.json``
  5. report     ``--out``: star_evidence.json (every run), star_evidence.md (tables: means,
                paired differences against arm_k1 at the same budget with 95% t intervals),
                star_evidence.png, star_evidence_slots.png, star_evidence_budget.png (the gap
                against the budget); the raw-pixel baseline is computed once
                (``runs/star_evidence/raw_pixels.json``). Runs found in ``--runs`` replace the
                rows of the same (arm, passes, seed) already in ``--out``'s star_evidence.json;
                the others are kept, so a report can grow across machines and sessions. The
                report is rewritten after every run, and runs it already holds are skipped:
                the committed result file alone resumes a grid in a fresh checkout.

    .venv/bin/python experiments/star_evidence.py                 # everything, resumable
    .venv/bin/python experiments/star_evidence.py --phase pretrain --arms star_k4 --seeds 0
    .venv/bin/python experiments/star_evidence.py --passes 3 6 --shard 0/2   # two processes,
    .venv/bin/python experiments/star_evidence.py --passes 3 6 --shard 1/2   # disjoint runs
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from star_mamba.engine.config import load_config
from star_mamba.checkpoint import write_json

PHASES = ("pretrain", "probe", "finetune", "diag", "report")


@dataclass(frozen=True)
class Arm:
    k: int
    sequence: str = "random"
    separator: str = "identity"
    separator_space: str = "pixel"
    pretrained: bool = True
    finetune: bool = False  # one of the main arms, also scored by a short fine-tune


ARMS: dict[str, Arm] = {
    "scratch": Arm(k=1, separator="none", pretrained=False, finetune=True),
    "arm_k1": Arm(k=1, separator="none", finetune=True),
    "star_k2": Arm(k=2, finetune=True),
    "star_k4": Arm(k=4, finetune=True),
    "star_k4_clip": Arm(k=4, sequence="clip"),
    "star_k4_same_class": Arm(k=4, sequence="same_class"),
    "star_k8_embedding": Arm(k=8, separator="embedding"),
    "star_k4_token": Arm(k=4, separator_space="token"),
}
BASELINE_ARM = "arm_k1"  # paired differences are taken against it (and against scratch)
GRID: dict[int, tuple[str, ...]] = {  # passes over the training images -> the arms run there
    1: ("scratch", "arm_k1", "star_k2", "star_k4", "star_k4_clip", "star_k4_same_class"),
    3: ("arm_k1", "star_k4", "star_k8_embedding", "star_k4_token"),
    6: ("arm_k1", "star_k4"),
}

# The model, sized for the budget (about two hours on 2 CPU cores for the pretrainings, README
# "Evidence"): star_tiny's layout at D 64, 4 blocks, a 2-block decoder 64 wide (taps 2 and 4),
# 32 px (Fashion-MNIST padded), 4 px patches, 2 x 2 clusters. One torch thread per process: two
# processes side by side (disjoint --arms) use 2 cores better than one with 2 threads.
MODEL = ["model.embed_dim=64", "model.depth=4", "model.decoder_dim=64", "model.decoder_depth=2",
         "model.decoder_heads=4"]
# One pass over all 60,000 training images per epoch, 64 images per step (937 steps),
# lr 1e-3 (blr 4e-3 x 64 / 256), 5% of the run's steps warm-up (0.05 x passes epochs), cosine to
# 0 over the whole run.
PRETRAIN = ["data.max_images=null", "optim.batch_size=64", "optim.blr=4e-3",
            "optim.warmup_epochs=0.05", "run.progress=false", "run.log_every=25",
            "run.save_every_steps=100", "run.tensorboard=false", "run.threads=1"]
# Short fine-tune: 2 scan directions, one pass over the 60,000 training images (937 steps; a
# first try with 10,000 images, 156 steps, stopped far from convergence: training loss 1.33 and
# 60-65% top-1 where the frozen features' linear probe gives 81%), all 10,000 test images.
FINETUNE = ["model.directions=2", "model.drop_path_rate=0.0", "data.max_images=null",
            "data.max_eval_images=null", "data.scale=[0.8, 1.0]", "optim.epochs=1",
            "optim.batch_size=64", "optim.blr=8e-3", "optim.layer_decay=0.9",
            "run.progress=false", "run.log_every=50", "run.tensorboard=false", "run.threads=1"]
DIAG_SEQUENCES = 64  # held-out test sequences for the diagnostics (K images each)
DIAG_SEED = 1234  # draws of the held-out diagnostic sequences (the same for every run)


def arm_overrides(name: str) -> list[str]:
    arm = ARMS[name]
    space = [f"model.separator_space={arm.separator_space}"] if arm.separator_space != "pixel" else []
    return [f"model.images_per_sequence={arm.k}", f"model.separator={arm.separator}",
            f"data.sequence={arm.sequence}", *space]


def pretrain_config(name: str, seed: int, run_dir: Path, passes: int, *extra: str):
    warmup = [] if passes == 1 else [f"optim.warmup_epochs={0.05 * passes:g}"]
    return load_config("pretrain/fashion_mnist", [*MODEL, *PRETRAIN, *arm_overrides(name),
                                                  f"optim.epochs={passes}", *warmup,
                                                  f"run.seed={seed}", f"run.output_dir={run_dir}",
                                                  *extra])


def run_path(runs: Path, name: str, seed: int, passes: int = 1) -> Path:
    return runs / name / ("" if passes == 1 else f"passes{passes}") / f"seed{seed}"


def jobs(seeds: list[int], passes: list[int], arms: list[str]) -> list[tuple[int, int, str]]:
    """(seed, passes, arm) of every run asked for, seed-major: a partial grid has every arm and
    budget of the first seeds."""
    return [(s, p, a) for s in seeds for p in passes for a in GRID[p] if a in arms]


def save(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)


def read_json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text()) if path.exists() else None


# ------------------------------------------------------------------------------ steps

def pretrain_step(name: str, seed: int, runs: Path, passes: int, *extra: str) -> Optional[dict]:
    """Pretrain (or resume); returns the saved summary. None for the scratch arm."""
    if not ARMS[name].pretrained:
        return None
    from star_mamba.tasks.pretrain import pretrain
    from star_mamba.tools.runner import tail_loss
    out = run_path(runs, name, seed, passes)
    done = out / "pretrain.json"
    if (summary := read_json(done)) is not None:
        return summary
    run_dir = out / "pretrain"
    result = pretrain(pretrain_config(name, seed, run_dir, passes, *extra))
    summary = dict(seconds=result["seconds"], steps=result.get("step"),
                   final_loss=tail_loss(run_dir / "metrics.jsonl"))
    save(done, summary)
    return summary


def checkpoint_source(name: str, seed: int, runs: Path, passes: int = 1):
    """What the probes start from: the pretraining checkpoint, or (scratch) the model's
    initialisation under ``seed`` as a {"model", "model_config"} dict: exactly the initial
    weights of arm_k1's pretraining with the same seed (built the way ``pretrain`` builds them)."""
    if ARMS[name].pretrained:
        return run_path(runs, name, seed, passes) / "pretrain" / "checkpoint-latest.pth"
    from star_mamba.models.pretrain import StarPretrain
    from star_mamba.seeding import seed_everything
    cfg = pretrain_config(name, seed, run_path(runs, name, seed) / "pretrain", 1)
    seed_everything(seed)
    model = StarPretrain(cfg.model.star_config())
    return {"model": model.state_dict(), "model_config": model.cfg.to_dict()}


def probe_datasets(data_root: Optional[str]):
    """All 60,000 training and 10,000 test images, no augmentation, as the model sees them."""
    from star_mamba.data import FashionMNIST
    return (FashionMNIST(data_root, "train", img_size=32, in_chans=1),
            FashionMNIST(data_root, "test", img_size=32, in_chans=1))


def probe_step(name: str, seed: int, runs: Path, passes: int, data_root: Optional[str]) -> dict:
    from star_mamba.evaluation.config import ProbeConfig
    from star_mamba.tasks.linprobe import evaluate_representation
    done = run_path(runs, name, seed, passes) / "probe.json"
    if (result := read_json(done)) is not None:
        return result
    train_set, test_set = probe_datasets(data_root)
    result = evaluate_representation(checkpoint_source(name, seed, runs, passes), train_set,
                                     test_set, ProbeConfig(batch_size=500), seed=seed,
                                     device="cpu", progress=False)
    save(done, result)
    return result


def finetune_step(name: str, seed: int, runs: Path, passes: int, data_root: Optional[str],
                  *extra: str) -> Optional[dict]:
    if not ARMS[name].finetune or passes != 1:
        return None
    from star_mamba.tools.runner import Probe, train_classifier
    out = run_path(runs, name, seed) / "finetune"
    if (result := read_json(out / "result.json")) is not None:
        return result
    pretrained = (run_path(runs, name, seed) / "pretrain" / "checkpoint-latest.pth"
                  if ARMS[name].pretrained else None)
    extra = [*extra, *([f"data.root={data_root}"] if data_root else [])]
    t = time.perf_counter()
    result = train_classifier(Probe("finetune", "finetune/fashion_mnist",
                                    (*MODEL[:2], *FINETUNE, *extra, f"run.seed={seed}")),
                              pretrained, out)
    if result["top1"] is None:  # stopped by --max-steps before its evaluation
        from star_mamba.tasks.finetune import evaluate_checkpoint
        result["top1"] = evaluate_checkpoint(out / "checkpoint-latest.pth", None, False)["top1"]
    result["seconds"] = round(time.perf_counter() - t, 1)
    save(out / "result.json", result)
    return result


def held_out_sequences(kind: str, k: int, n: int, data_root: Optional[str]) -> torch.Tensor:
    """``n`` held-out sequences of ``kind`` (random, clip, same_class) built from the 10,000
    test images with a fixed seed: (n*K, 1, 32, 32), sequence b's image k at b*K + k."""
    from star_mamba.config import StarConfig
    from star_mamba.data.build import build
    from star_mamba.data.config import DataConfig
    from star_mamba.data.sequences import build_sequence_dataset
    geometry = dict(img_size=32, patch_size=4, in_chans=1, cluster_size=2)
    images = build(DataConfig(root=data_root, split="test", sequence=kind),
                   StarConfig(**geometry, images_per_sequence=k), "train", "pretrain")
    sequences = build_sequence_dataset(kind, images, k, 32, 1, seed=DIAG_SEED)
    return torch.cat([sequences[i][0] for i in range(n)])  # (n*K, 1, 32, 32)


@torch.no_grad()
def ordered_slot_losses(model, images: torch.Tensor, batch: int = 32) -> list[float]:
    """Mean loss of each image slot over sequences taken in the order given (no rotation):
    in a clip, slot k is frame k, so a falling curve means earlier frames are used."""
    from star_mamba.evaluation.diagnostics import per_slot_losses
    k = model.cfg.images_per_sequence
    rows = []
    for i in range(0, images.shape[0], batch * k):
        out = model(images[i:i + batch * k])
        rows.append(per_slot_losses(out.patch_loss, model.cfg)[0])  # (B, K)
    return torch.cat(rows).mean(0).tolist()


def diag_step(name: str, seed: int, runs: Path, passes: int,
              data_root: Optional[str]) -> Optional[dict]:
    """The cross-image diagnostics of evaluation/diagnostics.py on held-out random test images
    (rotated so that every image is in every slot), plus the loss per slot of in-order held-out
    sequences of each kind (random, clip, same_class) for K > 1."""
    if not ARMS[name].pretrained:
        return None
    from star_mamba.evaluation.diagnostics import cross_image_diagnostics
    from star_mamba.models.io import load_pretrain
    done = run_path(runs, name, seed, passes) / "diag.json"
    if (result := read_json(done)) is not None:
        return result
    model = load_pretrain(checkpoint_source(name, seed, runs, passes))
    k = model.cfg.images_per_sequence
    _, test_set = probe_datasets(data_root)
    images = torch.stack([test_set[i][0] for i in range(DIAG_SEQUENCES * k)])  # (N*K, 1, 32, 32)
    result = cross_image_diagnostics(model, images)
    if k > 1:
        result["ordered_slot_loss"] = {
            kind: ordered_slot_losses(model, held_out_sequences(kind, k, DIAG_SEQUENCES,
                                                                data_root))
            for kind in ("random", "clip", "same_class")}
    save(done, result)
    return result


def raw_pixels(runs: Path, data_root: Optional[str]) -> dict:
    from star_mamba.evaluation.probe import raw_pixel_baseline
    done = runs / "raw_pixels.json"
    if (result := read_json(done)) is not None:
        return result
    train_set, test_set = probe_datasets(data_root)
    result = raw_pixel_baseline(train_set, test_set, device="cpu")
    save(done, result)
    return result


# ------------------------------------------------------------------------------ statistics

def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t confidence interval of ``values``."""
    from scipy.stats import t
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, math.nan
    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired(rows: list[dict], metric: str, arm: str, base: str, passes: int,
           base_passes: Optional[int] = None) -> Optional[dict]:
    """Paired differences (arm at ``passes``) - (base at ``base_passes``, default the same
    budget; scratch has none) of ``metric`` over the seeds both have."""
    base_passes = budget_of(base, passes if base_passes is None else base_passes)

    def values(name: str, p: int) -> dict[int, float]:
        return {r["pretrain_seed"]: r[metric] for r in rows
                if r["arm"] == name and r["passes"] == p and r[metric] is not None}

    a, b = values(arm, passes), values(base, base_passes)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean, lo, hi = t_interval(diffs)
    return dict(arm=arm, passes=passes, base=base, base_passes=base_passes, metric=metric,
                seeds=seeds, diffs=diffs, mean=mean, ci95=[lo, hi])


def budget_of(name: str, passes: int) -> int:
    """The budget a row records: passes over the images, 0 for the unpretrained scratch arm."""
    return passes if ARMS[name].pretrained else 0


# ------------------------------------------------------------------------------ report

METRICS = ("linear_probe_top1", "knn_top1", "finetune_top1")


def collect(runs: Path, seeds: list[int], arms: list[str], passes: list[int]) -> list[dict]:
    rows = []
    for seed, p, name in jobs(seeds, passes, arms):
        d = run_path(runs, name, seed, p)
        probe, pre = read_json(d / "probe.json"), read_json(d / "pretrain.json")
        ft, diag = read_json(d / "finetune" / "result.json"), read_json(d / "diag.json")
        if probe is None:
            continue
        arm = ARMS[name]
        rows.append(dict(arm=name, K=arm.k, sequence=arm.sequence, separator=arm.separator,
                         separator_space=arm.separator_space, passes=budget_of(name, p),
                         pretrain_seed=seed, pretrained=arm.pretrained,
                         linear_probe_top1=probe["linear_probe_top1"],
                         knn_top1=probe["knn_top1"], probe_weight_decay=probe["weight_decay"],
                         finetune_top1=ft["top1"] if ft else None,
                         pretrain_loss=pre["final_loss"] if pre else None,
                         pretrain_seconds=pre["seconds"] if pre else None,
                         probe_seconds={k: probe.get(f"seconds_{k}")
                                        for k in ("features", "linear", "knn")},
                         finetune_seconds=ft.get("seconds") if ft else None,
                         diagnostics=diag))
    return rows


def merge_previous(rows: list[dict], previous: Optional[dict]) -> list[dict]:
    """``rows`` plus the rows of an earlier report that no new run replaces (same arm, budget
    and seed). Rows written before the budget axis existed get ``passes`` (the report's
    ``epochs``; 0 for scratch) and ``separator_space`` ('pixel', the only space then)."""
    if not previous:
        return rows
    key = lambda r: (r["arm"], r["passes"], r["pretrain_seed"])  # noqa: E731
    have = {key(r) for r in rows}
    kept = []
    for r in previous["runs"]:
        r = dict(r)
        r.setdefault("passes", budget_of(r["arm"], previous.get("epochs", 1)))
        r.setdefault("separator_space", "pixel")
        if key(r) not in have:
            kept.append(r)
    order = {(a, p): i for i, (p, a) in enumerate((p, a) for p in GRID for a in GRID[p])}
    merged = kept + rows
    merged.sort(key=lambda r: (order.get((r["arm"], max(r["passes"], 1)), len(order)),
                               r["pretrain_seed"]))
    return merged


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (arm, passes) in grid order: mean, 95% interval and values of each metric,
    and the mean final pretraining loss."""
    out = []
    for p in GRID:
        for a in GRID[p]:
            group = [r for r in rows if r["arm"] == a and r["passes"] == budget_of(a, p)]
            if not group:
                continue
            entry: dict[str, Any] = dict(arm=a, passes=budget_of(a, p))
            for m in METRICS:
                vals = [r[m] for r in group if r[m] is not None]
                if vals:
                    mean, lo, hi = t_interval(vals)
                    entry[m] = dict(mean=mean, ci95=[lo, hi], values=vals)
            losses = [r["pretrain_loss"] for r in group if r["pretrain_loss"] is not None]
            entry["pretrain_loss"] = statistics.fmean(losses) if losses else None
            out.append(entry)
    return out


def paired_differences(rows: list[dict]) -> list[dict]:
    """Against arm_k1 at the same budget and against scratch (every pretrained arm), and each
    arm at a longer budget against itself at 1 pass."""
    diffs = []
    for m in METRICS:
        for p in GRID:
            for a in GRID[p]:
                if not ARMS[a].pretrained:
                    continue
                bases = [(b, None) for b in (BASELINE_ARM, "scratch") if b != a]
                bases += [(a, 1)] if p != 1 else []
                for base, bp in bases:
                    if (d := paired(rows, m, a, base, p, bp)) is not None:
                        diffs.append(d)
    return diffs


def write_report(rows: list[dict], raw: dict, out: Path, command: str) -> None:
    result = dict(command=command, passes={str(p): list(a) for p, a in GRID.items()},
                  model=MODEL, pretrain=PRETRAIN, finetune=FINETUNE,
                  raw_pixels=dict(linear_probe_top1=raw["linear_probe_top1"],
                                  knn_top1=raw["knn_top1"]),
                  runs=rows, summary=summarise(rows), paired_differences=paired_differences(rows))
    save(out / "star_evidence.json", result)
    (out / "star_evidence.md").write_text(to_markdown(result))
    plot(result, out / "star_evidence.png")
    plot_slots(result, out / "star_evidence_slots.png")
    plot_budget(result, out / "star_evidence_budget.png")


def _fmt(s: Optional[dict]) -> str:
    if not s:
        return "-"
    lo, hi = s["ci95"]
    ci = "" if math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
    return f"{s['mean']:.2f}{ci} (n={len(s['values'])})"


def _diff_row(d: dict) -> str:
    lo, hi = d["ci95"]
    ci = "-" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"
    return f"{d['mean']:+.2f} | {ci} | " + ", ".join(f"{x:+.2f}" for x in d["diffs"])


def _label(arm: str, passes: int) -> str:
    return arm if passes == 0 else f"{arm} @{passes}"


def to_markdown(result: dict) -> str:
    raw = result["raw_pixels"]
    lines = ["# STAR evidence v2 (Fashion-MNIST): arms and pretraining budgets", "",
             f"Command: `{result['command']}`", "",
             "Top-1 (%) on the 10,000 test images: mean [95% t interval] (n = pretraining seeds); "
             "passes = pretraining passes over the 60,000 training images (0: no pretraining). "
             f"Raw pixels: linear probe {raw['linear_probe_top1']:.2f}, 20-NN {raw['knn_top1']:.2f}.",
             "", "| arm | passes | K | sequence | separator | linear probe | 20-NN | fine-tune | "
             "final pretraining loss |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in result["summary"]:
        arm = ARMS[e["arm"]]
        sep = ("-" if not arm.pretrained else arm.separator if arm.separator in ("none", "embedding")
               else f"{arm.separator} ({arm.separator_space})")
        loss = f"{e['pretrain_loss']:.4f}" if e["pretrain_loss"] is not None else "-"
        lines.append(f"| {e['arm']} | {e['passes']} | {arm.k} | "
                     f"{arm.sequence if arm.pretrained else '-'} | {sep} | "
                     f"{_fmt(e.get('linear_probe_top1'))} | {_fmt(e.get('knn_top1'))} | "
                     f"{_fmt(e.get('finetune_top1'))} | {loss} |")
    diffs = result["paired_differences"]
    same = [d for d in diffs if d["base"] == BASELINE_ARM and d["metric"] != "finetune_top1"
            and d["arm"] != BASELINE_ARM]  # not arm_k1 at P passes against itself at 1
    lines += ["", f"The gap against {BASELINE_ARM} at the same budget (paired by seed), in points: "
              "mean [95% t interval]; per seed.", "",
              "| passes | arm | linear probe | 95% CI | per seed | 20-NN | 95% CI | per seed |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for d in [d for d in same if d["metric"] == "linear_probe_top1"]:
        knn = next((x for x in same if x["metric"] == "knn_top1" and x["arm"] == d["arm"]
                    and x["passes"] == d["passes"]), None)
        lines.append(f"| {d['passes']} | {d['arm']} | {_diff_row(d)} | "
                     + (_diff_row(knn) if knn else "- | - | -") + " |")
    lines += ["", "Every paired difference (same seed), in points.", "",
              "| metric | arm - base | mean | 95% CI | per seed |", "| --- | --- | --- | --- | --- |"]
    for d in diffs:
        lines.append(f"| {d['metric']} | {_label(d['arm'], d['passes'])} - "
                     f"{_label(d['base'], d['base_passes'])} | {_diff_row(d)} |")
    diag_rows = [r for r in result["runs"] if r["diagnostics"]]
    if diag_rows:
        lines += ["", "Cross-image diagnostics of the final checkpoints (held-out test sequences), "
                  "mean over seeds:", "",
                  "| arm | passes | loss per slot | paired gap (last - first) | "
                  "attention share / uniform |", "| --- | --- | --- | --- | --- |"]
        for e in result["summary"]:
            ds = [r["diagnostics"] for r in diag_rows
                  if r["arm"] == e["arm"] and r["passes"] == e["passes"]]
            if not ds:
                continue
            slots = [statistics.fmean(d[f"slot_loss/{i}"] for d in ds)
                     for i in range(ARMS[e["arm"]].k)]
            gap = [d.get("paired_gap_mean") for d in ds if d.get("paired_gap_mean") is not None]
            ratio = [d.get("attn_ratio_mean") for d in ds if d.get("attn_ratio_mean") is not None]
            lines.append(f"| {e['arm']} | {e['passes']} | {' / '.join(f'{x:.3f}' for x in slots)} | "
                         f"{f'{statistics.fmean(gap):+.4f}' if gap else '-'} | "
                         f"{f'{statistics.fmean(ratio):.2f}' if ratio else '-'} |")
        lines += ["", "Loss per slot of in-order held-out sequences (slot 0 .. K-1; in a clip slot k "
                  "is frame k), mean over seeds:", "", "| arm | passes | random | clip | same class |",
                  "| --- | --- | --- | --- | --- |"]
        for e in result["summary"]:
            ds = [r["diagnostics"]["ordered_slot_loss"] for r in diag_rows
                  if r["arm"] == e["arm"] and r["passes"] == e["passes"]
                  and "ordered_slot_loss" in r["diagnostics"]]
            if ds:
                cells = [" / ".join(f"{statistics.fmean(d[kind][i] for d in ds):.3f}"
                                    for i in range(ARMS[e["arm"]].k))
                         for kind in ("random", "clip", "same_class")]
                lines.append(f"| {e['arm']} | {e['passes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(result: dict, path: Path) -> None:
    """Bars of every arm at 1 pass (and scratch): mean, 95% whiskers, one dot per seed."""
    plt = _pyplot()
    metrics = [("linear_probe_top1", "linear probe"), ("knn_top1", "20-NN"),
               ("finetune_top1", "fine-tune")]
    entries = [e for e in result["summary"] if e["passes"] <= 1]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=120)
    for ax, (m, title) in zip(axes, metrics):
        shown = [e for e in entries if m in e]
        for i, e in enumerate(shown):
            s, a = e[m], e["arm"]
            lo, hi = s["ci95"]
            ax.bar(i, s["mean"], color="tab:gray" if a == "scratch" else
                   "tab:blue" if a == BASELINE_ARM else "tab:orange", alpha=0.75)
            if not math.isnan(lo):
                ax.errorbar(i, s["mean"], yerr=[[s["mean"] - lo], [hi - s["mean"]]], color="k",
                            capsize=4)
            ax.scatter([i] * len(s["values"]), s["values"], color="k", s=10, zorder=3)
        raw = result["raw_pixels"].get(m)
        if raw is not None:
            ax.axhline(raw, color="tab:red", ls="--", lw=1, label="raw pixels")
            ax.legend(loc="lower right", fontsize=7)
        vals = [v for e in shown for v in e[m]["values"]] + ([raw] if raw else [])
        if vals:
            ax.set_ylim(min(vals) - 3, max(vals) + 2)
        ax.set_xticks(range(len(shown)), [e["arm"] for e in shown], rotation=30, ha="right",
                      fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("test top-1 (%)")
    fig.suptitle("STAR evidence v2, one pretraining pass: bars = mean over pretraining seeds, "
                 "whiskers = 95% t interval, dots = seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_slots(result: dict, path: Path) -> None:
    """Loss per slot of in-order held-out sequences (one panel per sequence kind), one line per
    pretrained (arm, budget) with K > 1, mean over seeds: a line that falls means later images
    are predicted better because of the earlier ones."""
    plt = _pyplot()
    rows = [r for r in result["runs"] if r["diagnostics"] and "ordered_slot_loss" in r["diagnostics"]]
    if not rows:
        return
    kinds = ("random", "clip", "same_class")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=120)
    for ax, kind in zip(axes, kinds):
        for e in result["summary"]:
            ds = [r["diagnostics"]["ordered_slot_loss"][kind] for r in rows
                  if r["arm"] == e["arm"] and r["passes"] == e["passes"]]
            if ds:
                mean = [statistics.fmean(d[i] for d in ds) for i in range(len(ds[0]))]
                ax.plot(range(len(mean)), mean, marker="o", ms=3, label=_label(e["arm"], e["passes"]))
        ax.set_title(f"held-out {kind.replace('_', ' ')} sequences")
        ax.set_xlabel("image slot in the sequence")
        ax.set_ylabel("loss (per-patch MSE)")
        ax.set_xticks(range(max(ARMS[r["arm"]].k for r in rows)))
    axes[0].legend(fontsize=6)
    fig.suptitle("loss per slot, in order (mean over pretraining seeds; @P: P passes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_budget(result: dict, path: Path) -> None:
    """The gap against arm_k1 at the same budget (linear probe, 20-NN) against the budget, with
    95% whiskers and one dot per seed, and both arms' linear probe top-1 against the budget."""
    plt = _pyplot()
    gaps = [d for d in result["paired_differences"]
            if d["base"] == BASELINE_ARM and d["arm"] != BASELINE_ARM]  # same budget only
    if not any(d["passes"] > 1 for d in gaps):
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=120)
    arms = [a for a in ARMS if any(d["arm"] == a and d["passes"] > 1 for d in gaps)]
    offsets = {a: 0.12 * (i - (len(arms) - 1) / 2) for i, a in enumerate(arms)}
    for ax, (m, title) in zip(axes[:2], [("linear_probe_top1", "linear probe"),
                                         ("knn_top1", "20-NN")]):
        for a in arms:
            ds = sorted((d for d in gaps if d["arm"] == a and d["metric"] == m),
                        key=lambda d: d["passes"])
            x = [d["passes"] * (1 + offsets[a]) for d in ds]  # log axis: a relative offset
            y = [d["mean"] for d in ds]
            err = [[d["mean"] - d["ci95"][0] if not math.isnan(d["ci95"][0]) else 0 for d in ds],
                   [d["ci95"][1] - d["mean"] if not math.isnan(d["ci95"][1]) else 0 for d in ds]]
            line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=a,
                               ls="-" if len(ds) > 1 else "none")
            for xi, d in zip(x, ds):
                ax.scatter([xi] * len(d["diffs"]), d["diffs"], s=8, color=line[0].get_color(),
                           alpha=0.5)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(list(GRID), [str(p) for p in GRID])
        ax.minorticks_off()
        ax.set_xlabel("pretraining passes over the 60,000 images")
        ax.set_ylabel(f"top-1 gap vs {BASELINE_ARM} (points)")
        ax.set_title(f"{title}: arm - {BASELINE_ARM}, same budget and seed")
        ax.legend(fontsize=7)
    ax = axes[2]
    for a in (BASELINE_ARM, "star_k4"):
        es = [e for e in result["summary"] if e["arm"] == a and "linear_probe_top1" in e]
        s = [e["linear_probe_top1"] for e in es]
        ax.errorbar([e["passes"] for e in es], [x["mean"] for x in s],
                    yerr=[[0 if math.isnan(x["ci95"][0]) else x["mean"] - x["ci95"][0] for x in s],
                          [0 if math.isnan(x["ci95"][1]) else x["ci95"][1] - x["mean"] for x in s]],
                    marker="o", capsize=3, label=a)
    ax.axhline(result["raw_pixels"]["linear_probe_top1"], color="tab:red", ls="--", lw=1,
               label="raw pixels")
    ax.set_xscale("log")
    ax.set_xticks(list(GRID), [str(p) for p in GRID])
    ax.minorticks_off()
    ax.set_xlabel("pretraining passes over the 60,000 images")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.set_title("linear probe against the budget")
    ax.legend(fontsize=7)
    fig.suptitle("When does packing help? Paired gaps with 95% t intervals (dots: seeds)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ main

def finished_runs(previous: Optional[dict]) -> set[tuple[str, int, int]]:
    """(arm, passes, seed) of the rows an earlier report holds: those runs are not run again,
    so a grid goes on across sessions and machines from the committed result file alone."""
    rows = merge_previous([], previous) if previous else []
    return {(r["arm"], r["passes"], r["pretrain_seed"]) for r in rows}


def report(runs: Path, out: Path, args: argparse.Namespace, command: str) -> None:
    """Merges this process's runs into ``out``'s report, under a lock: shards write in turn."""
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / "report.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = read_json(out / "star_evidence.json")
        raw = (previous["raw_pixels"] if previous and not (runs / "raw_pixels.json").exists()
               else raw_pixels(runs, args.data_root))
        rows = merge_previous(collect(runs, args.seeds, args.arms, args.passes), previous)
        write_report(rows, raw, out, command)


def parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"invalid --shard {text!r}: expected I/N with 0 <= I < N")
    return int(i), int(n)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=[*PHASES, "all"], default="all")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--passes", type=int, nargs="+", choices=list(GRID), default=list(GRID),
                   help="pretraining budgets, in passes over the 60,000 images (GRID says which "
                        "arms run at each)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1),
                   help="I/N: run every N-th run of the list, starting at the I-th (start N "
                        "processes with I = 0..N-1 to share the runs; report with N = 1)")
    p.add_argument("--runs", default="runs/star_evidence", help="checkpoints, logs, per-run JSON")
    p.add_argument("--out", default="experiments/results", help="where the report goes")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: searched)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the probes")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop each pretraining and fine-tuning after this many steps (a smoke "
                        "run: use another --runs directory)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, phases = Path(args.runs), PHASES if args.phase == "all" else (args.phase,)
    extra = [f"run.max_steps={args.max_steps}"] if args.max_steps else []
    data = [f"data.root={args.data_root}"] if args.data_root else []
    steps = {"pretrain": lambda a, s, n: pretrain_step(a, s, runs, n, *extra, *data),
             "probe": lambda a, s, n: probe_step(a, s, runs, n, args.data_root),
             "finetune": lambda a, s, n: finetune_step(a, s, runs, n, args.data_root, *extra),
             "diag": lambda a, s, n: diag_step(a, s, runs, n, args.data_root)}
    shard, shards = args.shard
    out = Path(args.out)
    command = "python experiments/star_evidence.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv)
    reported = finished_runs(read_json(out / "star_evidence.json"))
    todo = [job for job in jobs(args.seeds, args.passes, args.arms)[shard::shards]
            if (job[2], budget_of(job[2], job[1]), job[0]) not in reported]
    for i, (seed, passes, name) in enumerate(todo, 1):  # each run through all its phases
        for phase in phases:
            if phase == "report":
                continue
            t = time.perf_counter()
            steps[phase](name, seed, passes)
            print(f"[{i}/{len(todo)}] [{phase}] {name} passes {passes} seed {seed}: "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        if "report" in phases:  # after every run: a session cut off keeps what it finished
            report(runs, out, args, command.strip())
    if "report" in phases:
        if not todo:  # nothing ran: the report of what --runs and --out hold
            report(runs, out, args, command.strip())
        print((out / "star_evidence.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
