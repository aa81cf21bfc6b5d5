"""``star-mamba ablate``: the paper's ablation axes on the built-in data, at a small budget.

Every grid point is one STAR pretraining run followed by a probe of its backbone (one
:func:`.runner.pretrain_then_probe` each): by default ``star-mamba linprobe``'s converged linear
probe of the frozen backbone (logistic regression to convergence, its weight decay picked on a
held-out part of the training images) and its 20-NN accuracy, or a short fine-tune
(``--probe finetune``); the score is top-1 on held-out test images. The axes are

  separator            zeros | ones | embedding | identity | none
  separator_position   SC | CS | SCS | CSC
  images_per_sequence  K = 1 | 2 | 4 | 8
  cluster_size         c = 1 | 2 | 4   (c x c patches per predicted segment)
  separator_space      pixel | token   (zeros / ones / identity as pixel patches through the
                                         patch embedding, or as D-dimensional token vectors)

By default the grid is "one factor at a time": a base point (the default run's STAR setting)
plus every other value of each axis with the rest held at the base, which costs
1 + sum(len(axis) - 1) runs instead of the product. ``--full`` runs the whole product.
A ``scratch`` row probes a randomly initialised backbone with the same budget, so one can see
whether pretraining helped at all, and a ``raw pixels`` row scores the same linear probe and
k-NN on the images' pixels (computed once per grid), so one can see whether a backbone beats
no model at all.

Layout of ``--out``::

    grid.json                       the points and the budget (a rerun must match it)
    raw_pixels.json                 the raw-pixel baseline
    runs/<point>/pretrain/          the engine's run directory (checkpoints, metrics)
    runs/<point>/probe/             the probe's run directory (linprobe.json, cached features)
    runs/<point>/result.json        written (atomically) when the point is finished
    ablation.md / .json / .png      the report, rewritten after every point

Interrupted, the same command picks up where it stopped: finished points are read back, an
unfinished run resumes from its latest checkpoint.
"""
from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import SEPARATORS, SEPARATOR_POSITIONS, SEPARATOR_SPACES
from ..checkpoint import write_json
from ..errors import ConfigError
from .runner import Pretraining, Probe, pixel_baseline, pretrain_then_probe

log = logging.getLogger("star_mamba")

AXES: dict[str, tuple] = {
    "separator": SEPARATORS,
    "separator_position": SEPARATOR_POSITIONS,
    "images_per_sequence": (1, 2, 4, 8),
    "cluster_size": (1, 2, 4),
    "separator_space": SEPARATOR_SPACES,
}
SHORT = {"separator": "sep", "separator_position": "pos", "images_per_sequence": "K",
         "cluster_size": "c", "separator_space": "space"}
BASE = {"separator": "identity", "separator_position": "SC", "images_per_sequence": 4,
        "cluster_size": 2, "separator_space": "pixel"}
NAMED_ONLY_OFF_BASE = ("separator_space",)  # left out of a point's name at its base value, so
# the names (and run folders) of grids made before the axis existed stay the same


@dataclass(frozen=True)
class Budget:
    """What one grid point costs. The defaults take about 2-3 minutes per point on 2 CPU cores."""

    depth: int = 6  # encoder blocks (star_tiny has 12)
    pretrain_images: int = 6400  # images seen in pretraining (one pass, batch 32)
    probe: str = "linprobe"  # linprobe (converged, frozen backbone) | finetune (one pass)
    probe_images: int = 10000  # training images of the probe
    eval_images: int = 5000  # held-out test images scored
    probe_blr: Optional[float] = None  # fine-tune only; None: 8e-3
    seed: int = 0
    extra: tuple[str, ...] = ()  # further --set overrides, applied to both runs

    def validate(self) -> None:
        if self.probe not in ("linprobe", "finetune"):
            raise ConfigError(f"invalid probe {self.probe!r}; allowed values are linprobe, finetune")
        if self.probe_blr is not None and not self.probe_blr > 0:
            raise ConfigError(f"invalid probe_blr={self.probe_blr}: must be > 0")
        if self.probe_blr is not None and self.probe != "finetune":
            raise ConfigError("probe_blr (--probe-blr) sets the fine-tune's lr; the linear probe "
                             "is fitted to convergence and has none")
        for name in ("depth", "pretrain_images", "probe_images", "eval_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"invalid {name}={getattr(self, name)}: must be >= 1")


@dataclass(frozen=True)
class Point:
    """One grid point: the axis values, or ``scratch`` (no pretraining)."""

    separator: str = BASE["separator"]
    separator_position: str = BASE["separator_position"]
    images_per_sequence: int = BASE["images_per_sequence"]
    cluster_size: int = BASE["cluster_size"]
    separator_space: str = BASE["separator_space"]
    scratch: bool = False

    @property
    def name(self) -> str:
        if self.scratch:
            return "scratch"
        return "_".join(f"{SHORT[a]}-{getattr(self, a)}" for a in AXES
                        if a not in NAMED_ONLY_OFF_BASE or getattr(self, a) != BASE[a])

    def settings(self) -> dict[str, Any]:
        return {a: getattr(self, a) for a in AXES}

    def differs_from_base(self) -> list[str]:
        return [a for a in AXES if getattr(self, a) != BASE[a]]


# --------------------------------------------------------------------------- the grid
def parse_axes(specs: Sequence[str]) -> dict[str, tuple]:
    """``["separator=none,identity", "K=1,4"]`` -> restricted axes (short names allowed)."""
    axes = dict(AXES)
    long = {v: k for k, v in SHORT.items()} | {k: k for k in AXES}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or key not in long:
            raise ConfigError(f"invalid --axis {spec!r}: expected NAME=V1,V2,... with NAME one of "
                             f"{', '.join(AXES)} (or {', '.join(SHORT.values())})")
        axis = long[key]
        kind = type(AXES[axis][0])
        try:
            chosen = tuple(kind(v.strip()) for v in values.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"invalid --axis {spec!r}: {axis} takes {kind.__name__} values") from None
        bad = [v for v in chosen if v not in AXES[axis]]
        if bad or not chosen:
            raise ConfigError(f"invalid --axis {spec!r}: allowed {axis} values are "
                             f"{', '.join(map(str, AXES[axis]))}")
        axes[axis] = chosen
    return axes


def grid_points(axes: dict[str, tuple] = AXES, full: bool = False, scratch: bool = True) -> list[Point]:
    """The points to run, without duplicates, base first.

    Points that only differ in a setting that has no effect are merged: without a separator the
    position and the space are meaningless (kept at the base), a learned ``embedding`` separator
    is a token whichever space is asked for (kept at the base), and so on.
    """
    if full:
        combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    else:
        combos = [dict(BASE)]
        for axis, values in axes.items():
            combos += [dict(BASE, **{axis: v}) for v in values if v != BASE[axis]]
    points: list[Point] = []
    for c in combos:
        if c["separator"] == "none":
            c["separator_position"] = BASE["separator_position"]
        if c["separator"] in ("none", "embedding"):
            c["separator_space"] = BASE["separator_space"]
        p = Point(**c)
        if p not in points:
            points.append(p)
    if scratch:
        points.append(Point(scratch=True))
    return points


def check_point(point: Point, img_size: int, patch_size: int, batch_size: int) -> Optional[str]:
    """Why a point cannot run with this data/model, or None."""
    grid = img_size // patch_size
    if grid % point.cluster_size:
        return f"cluster_size={point.cluster_size} does not divide the {grid}x{grid} patch grid"
    if batch_size % point.images_per_sequence:
        return f"batch size {batch_size} is not a multiple of K={point.images_per_sequence}"
    return None


# --------------------------------------------------------------------------- one point
PRETRAIN_CONFIG = "pretrain/fashion_mnist"
PROBE_CONFIGS = {"linprobe": "linprobe/fashion_mnist", "finetune": "finetune/fashion_mnist"}
QUIET = ["run.progress=false", "run.tensorboard=false", "run.log_every=20"]
PROBE_KINDS = {"linprobe": "representation", "finetune": "finetune"}  # runner probe kinds
FINETUNE_SHORT = ["model.directions=2", "model.drop_path_rate=0.0", "data.scale=[0.8, 1.0]",
                  "optim.layer_decay=0.9"]  # a one-pass fine-tune
FINETUNE_BLR = 8e-3


def pretrain_overrides(point: Point, budget: Budget) -> list[str]:
    return [f"model.depth={budget.depth}", f"data.max_images={budget.pretrain_images}",
            "optim.epochs=1", f"run.seed={budget.seed}", *QUIET,
            *(f"model.{a}={v}" for a, v in point.settings().items()), *budget.extra]


def probe_overrides(budget: Budget) -> list[str]:
    out = [f"model.depth={budget.depth}", f"data.max_images={budget.probe_images}",
           f"data.max_eval_images={budget.eval_images}", f"run.seed={budget.seed}", *QUIET]
    if budget.probe == "finetune":
        out += ["optim.epochs=1", f"optim.blr={budget.probe_blr or FINETUNE_BLR}",
                *FINETUNE_SHORT]
    return out + list(budget.extra)


def point_probe(budget: Budget) -> Probe:
    return Probe(PROBE_KINDS[budget.probe], PROBE_CONFIGS[budget.probe],
                 tuple(probe_overrides(budget)))


def baseline_probe(budget: Budget) -> Probe:
    """The linear probe with the grid's images and seed, whatever scores the points."""
    return point_probe(Budget(**{**asdict(budget), "probe": "linprobe", "probe_blr": None}))


def run_point(point: Point, budget: Budget, root: Path) -> dict[str, Any]:
    """Pretrain (unless scratch) then probe; resumes; returns the point's result row."""
    pretraining = (None if point.scratch else
                   Pretraining(tuple(pretrain_overrides(point, budget)), PRETRAIN_CONFIG))
    return pretrain_then_probe(root / "runs" / point.name, point_probe(budget), pretraining,
                               meta=dict(name=point.name, scratch=point.scratch,
                                         **point.settings(), budget=asdict(budget)))


# --------------------------------------------------------------------------- report
def group_rows(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by the axis they vary (one-factor grid) or all together (full grid)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["scratch"]:
            continue
        diff = [a for a in AXES if row.get(a, BASE[a]) != BASE[a]]  # rows made before an axis
        if len(diff) > 1:
            return [("grid", [r for r in rows if not r["scratch"]])]
        for axis in AXES:
            if not diff or diff == [axis]:
                groups.setdefault(axis, []).append(row)
    varied = [(a, sorted(groups[a], key=lambda r: AXES[a].index(r.get(a, BASE[a]))))
              for a in AXES if len(groups.get(a, ())) > 1]
    if varied:
        return varied
    return [("base", groups[next(iter(groups))][:1])] if groups else []


def _cells(row: dict, linear: bool) -> str:
    """The score cells of a row: linear probe and k-NN top-1, or the fine-tune's top-1."""
    if not linear:
        return f"{row['top1']:.2f}"
    knn = row.get("knn_top1")
    return f"{row['top1']:.2f} | " + (f"{knn:.2f}" if knn is not None else "-")


def to_markdown(rows: list[dict], budget: Budget, command: str, batch_size: int = 32,
                pixels: Optional[dict] = None) -> str:
    """The table: one row per point, then no pretraining and (``pixels``) raw pixels."""
    linear = budget.probe == "linprobe"
    score = "linear probe top-1 (%) | k-NN top-1 (%)" if linear else "fine-tune top-1 (%)"
    lines = [f"| axis | setting | {score} | pretrain loss | minutes |",
             "| --- | --- | --- |" + (" --- |" if linear else "") + " --- | --- |"]
    for axis, group in group_rows(rows):
        for row in group:
            setting = (", ".join(f"{SHORT[a]}={row.get(a, BASE[a])}" for a in AXES
                                 if a not in NAMED_ONLY_OFF_BASE or row.get(a, BASE[a]) != BASE[a])
                       if axis in ("grid", "base") else
                       f"{row[axis]}" + (" (base)" if row[axis] == BASE[axis] else ""))
            loss = f"{row['pretrain_loss']:.4f}" if row["pretrain_loss"] is not None else "-"
            lines.append(f"| {axis} | {setting} | {_cells(row, linear)} | {loss} | "
                         f"{row['seconds'] / 60:.1f} |")
    for row in rows:
        if row["scratch"]:
            lines.append(f"| - | no pretraining | {_cells(row, linear)} | - | "
                         f"{row['seconds'] / 60:.1f} |")
    if pixels is not None:
        cells = (f"{pixels['linear_probe_top1']:.2f} | {pixels['knn_top1']:.2f}" if linear else
                 f"{pixels['linear_probe_top1']:.2f}")
        lines.append(f"| - | raw pixels{'' if linear else ' (linear probe)'} | {cells} | - | "
                     f"{pixels['seconds'] / 60:.1f} |")
    b = budget
    knn_k = pixels["knn_k"] if pixels is not None else 20
    probe = (f"linear probe of the frozen backbone: pooled features of {b.probe_images} "
             "training images, logistic regression trained to convergence (L-BFGS, weight decay "
             f"picked on a held-out 10%), and {knn_k}-NN (cosine); top-1 on {b.eval_images} test "
             "images" if linear else
             f"fine-tune on {b.probe_images} images (one pass, blr {b.probe_blr or FINETUNE_BLR}), "
             f"top-1 on {b.eval_images} test images")
    lines += ["", f"Budget per point: star_tiny at depth {b.depth}, pretraining on "
              f"{b.pretrain_images} Fashion-MNIST images (one pass, batch {batch_size}), {probe}, "
              f"seed {b.seed}. No pretraining: the same probe of a randomly initialised backbone; "
              "raw pixels: the linear probe and k-NN on the standardised pixels of the same "
              "images. Pretraining losses are not comparable across settings (the targets "
              "differ); the probe is the measure.", "", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, pixels: Optional[dict] = None) -> None:
    """Bars: each point's top-1 (linear probe or fine-tune); dots: k-NN top-1; lines: no
    pretraining (dashed) and raw pixels (dotted, its linear probe)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(rows)
    scratch = [r["top1"] for r in rows if r["scratch"]]
    if not groups:
        return
    references = [(s, dict(color="k", ls="--", label="no pretraining")) for s in scratch]
    if pixels is not None:
        references.append((pixels["linear_probe_top1"],
                           dict(color="tab:red", ls=":", label="raw pixels")))
    widths = [max(len(g), 2) for _, g in groups]  # one unit per bar: labels never crowd
    fig, axs = plt.subplots(1, len(groups), figsize=(0.8 * sum(widths) + 1.5, 3.4), dpi=120,
                            sharey=True, squeeze=False, gridspec_kw=dict(width_ratios=widths))
    knn = [r["knn_top1"] for _, g in groups for r in g if r.get("knn_top1") is not None]
    scores = [r["top1"] for _, g in groups for r in g] + knn + [v for v, _ in references]
    lo, hi = min(scores), max(scores)
    for ax, (axis, group) in zip(axs[0], groups):
        labels = [str(r.get(axis, BASE.get(axis))) if axis in AXES else r["name"].replace("_", "\n") for r in group]
        colors = ["tab:orange" if axis not in AXES or r.get(axis, BASE[axis]) == BASE[axis]
                  else "tab:blue"
                  for r in group]
        bars = ax.bar(range(len(group)), [r["top1"] for r in group], color=colors, alpha=0.85)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        points = [(i, r["knn_top1"]) for i, r in enumerate(group) if r.get("knn_top1") is not None]
        if points:
            ax.scatter(*zip(*points), color="k", marker="D", s=14, zorder=3, label="k-NN")
        ax.set_xticks(range(len(group)), labels, fontsize=9 if axis in AXES else 7)
        ax.set_title(axis.replace("_", " "), fontsize=10)
        for value, style in references:
            ax.axhline(value, lw=1, **style)
        ax.set_ylim(lo - max(1.0, 0.15 * (hi - lo)), hi + max(1.0, 0.12 * (hi - lo)))
    linear = any(r.get("knn_top1") is not None for r in rows)
    axs[0][0].set_ylabel("linear probe top-1 (%)" if linear else "fine-tune top-1 (%)")
    if references or linear:
        axs[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("STAR ablations on Fashion-MNIST (orange: base setting)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(rows: list[dict], budget: Budget, out: Path, command: str,
                 batch_size: int = 32, pixels: Optional[dict] = None) -> str:
    md = to_markdown(rows, budget, command, batch_size, pixels)
    (out / "ablation.md").write_text(md)
    write_json(out / "ablation.json", dict(points=rows, raw_pixels=pixels))
    plot(rows, out / "ablation.png", pixels)
    return md


# --------------------------------------------------------------------------- the command
def ablate(out: str | Path, budget: Budget = Budget(), axes: dict[str, tuple] = AXES,
           full: bool = False, scratch: bool = True, dry_run: bool = False,
           command: str = "star-mamba ablate") -> list[dict]:
    """Run (or resume) the grid into ``out``; returns the result rows of the finished points."""
    from ..engine.config import load_config

    budget.validate()
    out = Path(out)
    points = grid_points(axes, full, scratch)
    base_cfg = load_config(PRETRAIN_CONFIG, list(budget.extra))  # the shared model/data settings
    model = base_cfg.model.star_config()
    img, patch = model.img_size, model.patch_size
    problems = [f"{p.name}: {why}" for p in points
                if (why := check_point(p, img, patch, base_cfg.optim.batch_size))]
    if problems:
        raise ConfigError("invalid grid:\n  " + "\n  ".join(problems))
    print(f"{len(points)} points, budget {asdict(budget)}")
    for p in points:
        print(f"  {p.name}")
    if dry_run:
        return []
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(budget=asdict(budget), points=[p.name for p in points])
    grid_file = out / "grid.json"
    if grid_file.exists():
        old = json.loads(grid_file.read_text())
        if old["budget"] != json.loads(json.dumps(spec["budget"])):
            raise ConfigError(f"{out} holds a grid run with another budget ({old['budget']}); "
                             "use a new --out directory or the same budget")
        spec["points"] = list(dict.fromkeys(old["points"] + spec["points"]))
    write_json(grid_file, spec)
    print("raw pixels (the baseline, once per grid)", flush=True)
    pixels = pixel_baseline(out, baseline_probe(budget))
    print(f"raw pixels: linear probe top-1 {pixels['linear_probe_top1']:.2f}%, "
          f"{pixels['knn_k']}-NN top-1 {pixels['knn_top1']:.2f}%", flush=True)
    rows, report = [], ""
    for i, point in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {point.name}", flush=True)
        row = run_point(point, budget, out)
        rows.append(row)
        knn = f", k-NN {row['knn_top1']:.2f}%" if row.get("knn_top1") is not None else ""
        print(f"[{i}/{len(points)}] {point.name}: top-1 {row['top1']:.2f}%{knn} "
              f"({row['seconds'] / 60:.1f} min)", flush=True)
        report = write_report(rows, budget, out, command, base_cfg.optim.batch_size, pixels)
    print(report, end="")
    return rows
