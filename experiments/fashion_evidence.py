"""Does STAR pretraining help? Fine-tuning on Fashion-MNIST from three starts, several seeds.

Arms (same model, same fine-tuning budget):
  star     pretrained with STAR: K = 4 images per sequence, identity separators, SC
  arm      pretrained ARM-style: K = 1, no separator
  scratch  no pretraining
Both pretrainings see the same number of images with the same optimiser settings. Writes
``fashion_evidence.json``, ``fashion_evidence.md`` and ``fashion_evidence.png`` into ``--out``
(checkpoints and logs go to ``--runs``); interrupted, it resumes (finished runs are read back, unfinished ones continue).

    .venv/bin/python experiments/fashion_evidence.py [--seeds 0 1 2] [--out experiments/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from star_mamba.tools.runner import Pretraining, Probe, pretrain_then_probe

# A small budget that fits about an hour on 2 CPU cores: star_tiny at half depth (6 blocks),
# 2-direction classifier, 19,200 pretraining images, 8,000 fine-tuning images (one pass, lr 2e-3,
# layer decay 0.9, no drop path: a short budget), 5,000 test images.
MODEL = ["model.depth=6"]
PRETRAIN = ["data.max_images=19200", "optim.epochs=1", "run.progress=false", "run.log_every=20",
            "run.tensorboard=false"]
ARMS = {
    "star": ["model.images_per_sequence=4", "model.separator=identity", "model.separator_position=SC"],
    "arm": ["model.images_per_sequence=1", "model.separator=none"],
}
FINETUNE = ["model.directions=2", "model.drop_path_rate=0.0", "data.max_images=8000",
            "data.max_eval_images=5000", "data.scale=[0.8, 1.0]", "optim.epochs=1",
            "optim.blr=8e-3", "optim.layer_decay=0.9", "run.progress=false", "run.log_every=25",
            "run.tensorboard=false"]


def run_arm(arm: str, seed: int, runs: Path) -> dict:
    """Fine-tune ``arm``'s start with ``seed``; the pretraining of an arm is shared by its seeds.
    ``seconds`` is the fine-tuning's wall clock."""
    pretraining = (None if arm == "scratch" else
                   Pretraining((*MODEL, *PRETRAIN, *ARMS[arm]), "pretrain/fashion_mnist",
                               run_dir=runs / f"pretrain_{arm}"))
    probe = Probe("finetune", "finetune/fashion_mnist", (*MODEL, *FINETUNE, f"run.seed={seed}"))
    run_dir = runs / f"finetune_{arm}_seed{seed}"  # the fine-tuning's run dir holds result.json
    result = pretrain_then_probe(run_dir, probe, pretraining, probe_dir=run_dir)
    return dict(arm=arm, seed=seed, top1=result["top1"], seconds=result["probe_seconds"])


def write_report(rows: list[dict], out: Path, command: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"star": "STAR (K=4, identity, SC)", "arm": "ARM-style (K=1, no separator)",
              "scratch": "from scratch"}
    lines = ["| start | top-1 (%) mean ± std | seeds | per seed |", "| --- | --- | --- | --- |"]
    stats = {}
    for arm in labels:
        vals = [r["top1"] for r in rows if r["arm"] == arm]
        if not vals:
            continue
        mean, std = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        stats[arm] = (mean, std, vals)
        lines.append(f"| {labels[arm]} | {mean:.2f} ± {std:.2f} | {len(vals)} | "
                     f"{', '.join(f'{v:.2f}' for v in vals)} |")
    md = "\n".join(lines) + f"\n\nCommand: `{command}`\n"
    (out / "fashion_evidence.md").write_text(md)
    (out / "fashion_evidence.json").write_text(json.dumps(rows, indent=1))
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=120)
    names = list(stats)
    ax.bar(range(len(names)), [stats[a][0] for a in names], yerr=[stats[a][1] for a in names],
           capsize=6, color=["tab:orange", "tab:blue", "tab:gray"][: len(names)], alpha=0.8)
    for i, a in enumerate(names):
        ax.scatter([i] * len(stats[a][2]), stats[a][2], color="k", s=12, zorder=3)
    ax.set_xticks(range(len(names)), [labels[a].split(" (")[0] for a in names])
    lo = min(v for a in names for v in stats[a][2])
    ax.set_ylim(lo - 3, max(v for a in names for v in stats[a][2]) + 1.5)
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title("fine-tuned from each start (mean ± std, dots = seeds)")
    fig.tight_layout()
    fig.savefig(out / "fashion_evidence.png")
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="experiments/results", help="where the report goes")
    p.add_argument("--runs", default="runs/fashion_evidence", help="checkpoints and logs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_arm(arm, seed, Path(args.runs)) for seed in args.seeds
            for arm in ("star", "arm", "scratch")]
    command = "python experiments/fashion_evidence.py --seeds " + " ".join(map(str, args.seeds))
    write_report(rows, out, command)


if __name__ == "__main__":
    main()
