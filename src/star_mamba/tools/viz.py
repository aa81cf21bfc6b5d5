"""Look inside a STAR pretraining checkpoint: what it predicts, and where the loss is.

Three figures (plus the numbers behind the last two):

- ``predictions.png``: for a few packed sequences, the K input images side by side, the model's
  prediction of every image cluster (each prediction made from the segments before it) and the
  true pixels of the targets;
- ``loss_per_position.png`` / ``loss_per_position.json``: the prediction loss of cluster g of the
  k-th image of a sequence, averaged over some batches. Images after the first can use what the
  earlier images of their sequence showed, so their first clusters may be easier (whether they
  are depends on the model and on how related the images packed together are);
- ``diagnostics.png`` / ``diagnostics.json``: the cross-image diagnostics
  (``evaluation/diagnostics.py``: loss per image slot, paired first/last gap, decoder attention on
  the current image) the run logged over its steps, and their values for this checkpoint.

The pure helpers (:func:`unnormalize_patches`, :func:`segments_to_images`,
:func:`loss_per_position`) work on the tensors of :class:`~star_mamba.models.pretrain.PretrainOutput`
(and on ``StarPretrain.target_pixels``, the targets before normalisation) and are tested on their
own; :func:`visualize` strings them together.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from .. import sequence as seq
from ..config import StarConfig
from ..errors import ConfigError, DataError

log = logging.getLogger("star_mamba")

__all__ = ["unnormalize_patches", "segment_index_table", "segments_to_images",
           "unpredicted_clusters", "loss_per_position", "diagnostic_series",
           "load_pretrain_checkpoint", "visualize"]


# ---------------------------------------------------------------------------- pure helpers

def unnormalize_patches(pred: Tensor, target_raw: Tensor, eps: float = 1e-6) -> Tensor:
    """Map predictions in per-patch normalised space back to pixels.

    Exactly inverts :func:`star_mamba.sequence.normalize_patches` (biased variance, ``eps`` added
    to the variance inside the square root): each patch of ``pred`` is scaled by the standard
    deviation and shifted by the mean of the matching patch of ``target_raw`` (the true pixels),
    as MAE does to show ``norm_pix_loss`` predictions. Shapes: (..., P) and (..., P).
    """
    if pred.shape != target_raw.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target_raw {tuple(target_raw.shape)} "
                         "must have the same shape")
    target_raw = target_raw.to(pred.dtype)
    mean = target_raw.mean(dim=-1, keepdim=True)
    var = target_raw.var(dim=-1, keepdim=True, unbiased=False)
    return pred * (var + eps).sqrt() + mean


def segment_index_table(cfg: StarConfig) -> Tensor:
    """(K, G) int64: the packed-sequence segment index of image k's cluster g."""
    layout = seq.segment_layout(cfg.clusters_per_image, cfg.separator_position, cfg.has_separator)
    per_image = torch.tensor([layout.index(g) for g in range(cfg.clusters_per_image)])
    k = torch.arange(cfg.images_per_sequence)[:, None]
    return k * len(layout) + per_image[None, :]


def unpredicted_clusters(cfg: StarConfig) -> Tensor:
    """(K, G) bool: True for the image cluster that is segment 0 (never a target), if any."""
    return segment_index_table(cfg) == 0


def segments_to_images(segments: Tensor, cfg: StarConfig, fill: float = float("nan")) -> Tensor:
    """Per-segment patches of segments 1..T-1 -> the images they cover, in raster order.

    ``segments``: (T-1, c^2, p*p*C) for one sequence, or (B, T-1, c^2, p*p*C), as ``pred`` and
    ``target`` of ``PretrainOutput``. Returns (K, C, H, W), or (B*K, C, H, W) with image k of
    sequence b at ``b * K + k``. Separator segments are skipped; the pixels of an image cluster
    that is segment 0 (never predicted: CS, CSC and no-separator layouts) are ``fill``.
    """
    single = segments.ndim == 3
    if single:
        segments = segments.unsqueeze(0)
    b, t1, c2, pdim = segments.shape
    if t1 != cfg.num_segments - 1 or c2 != cfg.tokens_per_segment or pdim != cfg.patch_dim:
        raise ValueError(f"segments of shape {tuple(segments.shape)} do not match the config: "
                         f"expected (B, {cfg.num_segments - 1}, {cfg.tokens_per_segment}, "
                         f"{cfg.patch_dim})")
    first = segments.new_full((b, 1, c2, pdim), fill)
    full = torch.cat([first, segments], dim=1)  # (B, T, c^2, P)
    index = segment_index_table(cfg).to(segments.device)  # (K, G)
    k, g = index.shape
    clusters = full[:, index.reshape(-1)]  # (B, K*G, c^2, P)
    tokens = clusters.reshape(b * k, g * c2, pdim)  # (B*K, N, P) cluster order
    gs = cfg.grid_size
    inv = seq.inverse_order(seq.cluster_order((gs, gs), cfg.cluster_size)).to(segments.device)
    images = seq.unpatchify(tokens[:, inv], cfg.patch_size, (gs, gs), cfg.in_chans)
    return images


def loss_per_position(patch_loss: Tensor, cfg: StarConfig) -> Tensor:
    """Mean per-patch MSE of every image cluster, (K, G) float: row k = k-th image of the
    sequence, column g = cluster g in cluster order, averaged over the batch and the cluster's
    c^2 patches. ``patch_loss``: ``PretrainOutput.patch_loss``, (B, T-1, c^2). The cluster that
    is segment 0 (never predicted) is NaN; separator targets are not included.
    """
    expected = (cfg.num_segments - 1, cfg.tokens_per_segment)
    if patch_loss.ndim != 3 or tuple(patch_loss.shape[1:]) != expected:
        raise ValueError(f"patch_loss of shape {tuple(patch_loss.shape)} does not match the "
                         f"config: expected (B, {', '.join(map(str, expected))})")
    per_patch = patch_loss.float().mean(dim=(0, 2))  # (T-1,)
    full = torch.cat([per_patch.new_full((1,), float("nan")), per_patch])  # (T,)
    return full[segment_index_table(cfg).to(full.device)]


# ---------------------------------------------------------------------------- loading

def load_pretrain_checkpoint(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """A STAR pretraining checkpoint (``.pth`` from ``star-mamba pretrain``, ``.safetensors``, or
    a run directory holding ``checkpoint-latest.pth``) -> (``StarPretrain`` in eval mode, path).

    Loads with ``weights_only`` (no code runs), through ``models/io.py``. A missing file raises
    ``MissingFileError``; a classifier checkpoint or one without a model config
    ``CheckpointError``.
    """
    model, path, _, _ = _load_pretrain(checkpoint, device)
    return model, path


def _load_pretrain(checkpoint: str | Path, device: str | torch.device):
    """(model, path, the optimizer step it was saved at or None when it does not say, the run
    config saved with it or None)."""
    from ..checkpoint import load_checkpoint, resolve_checkpoint
    from ..models.io import load_pretrain

    path = resolve_checkpoint(checkpoint)
    payload = load_checkpoint(path)  # read once: the step and the model
    saved_state = payload.get("state") if isinstance(payload, dict) else None
    step = saved_state.get("step") if isinstance(saved_state, dict) else None
    run_config = payload.get("run_config") if isinstance(payload, dict) else None
    return load_pretrain(payload, name=str(path)).to(device), path, step, run_config


def _batch_size(requested: int, k: int) -> int:
    return max(k, requested - requested % k)


# ---------------------------------------------------------------------------- figures

def _plot_predictions(path: Path, rows: list[tuple[str, Tensor]], cfg: StarConfig,
                      num_sequences: int, title: str) -> None:
    """rows: (label, (S*K, C, H, W) display images in [0, 1], NaN where not predicted)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    k = cfg.images_per_sequence
    n_rows = len(rows) * num_sequences
    fig = Figure(figsize=(1.6 * k + 1.2, 1.6 * n_rows + 0.8), dpi=110)
    grid = fig.add_gridspec(n_rows, k, hspace=0.35, wspace=0.08)
    missing = unpredicted_clusters(cfg)  # (K, G)
    span = cfg.cluster_size * cfg.patch_size
    gw = cfg.cluster_grid
    for s in range(num_sequences):
        for r, (label, images) in enumerate(rows):
            row = s * len(rows) + r
            for j in range(k):
                ax = fig.add_subplot(grid[row, j])
                img = images[s * k + j]  # (C, H, W)
                nan = torch.isnan(img)
                img = torch.where(nan, torch.full_like(img, 0.5), img)
                if cfg.in_chans == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
                if nan.any():
                    for g in missing[j].nonzero().flatten().tolist():
                        y, x = (g // gw) * span, (g % gw) * span
                        ax.add_patch(Rectangle((x - 0.5, y - 0.5), span, span, fill=False,
                                               edgecolor="red", linewidth=1.2, linestyle="--"))
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"seq {s}, image {j}", fontsize=8)
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, bbox_inches="tight")


def _plot_loss(path: Path, table: Tensor, cfg: StarConfig, title: str) -> None:
    from matplotlib.figure import Figure

    k, g = table.shape
    fig = Figure(figsize=(10, 4), dpi=110)
    ax, bars = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[3, 1.2]))
    xs = list(range(g))
    for i in range(k):
        ax.plot(xs, table[i].tolist(), marker="o", markersize=3, linewidth=1.2,
                label=f"image {i}" + (" (first)" if i == 0 else ""))
    for row_start in range(cfg.cluster_grid, g, cfg.cluster_grid):
        ax.axvline(row_start - 0.5, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlabel("cluster g within the image (cluster order; grey lines: new cluster row)")
    ax.set_ylabel("MSE per patch" + (" (normalised targets)" if cfg.norm_target else ""))
    ax.set_xticks(xs if g <= 32 else xs[::max(1, g // 16)])
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss by position in the packed sequence", fontsize=9)
    means = torch.nanmean(table, dim=1).tolist()
    first = table[:, : cfg.cluster_grid]
    first_row = [float("nan") if torch.isnan(r).all() else torch.nanmean(r).item() for r in first]
    width = 0.4
    bars.bar([i - width / 2 for i in range(k)], means, width, label="all clusters")
    bars.bar([i + width / 2 for i in range(k)], first_row, width, label="first cluster row")
    bars.set_xticks(range(k))
    bars.set_xlabel("image k in the sequence")
    bars.set_title("mean per image", fontsize=9)
    top = max([v for v in means + first_row if not math.isnan(v)], default=1.0)
    bars.set_ylim(0, 1.35 * top)  # room for the legend above the bars
    bars.legend(fontsize=8, loc="upper center", ncol=1)
    bars.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def diagnostic_series(rows: Iterable[dict[str, Any]]) -> dict[str, list]:
    """The cross-image diagnostics a run logged (the ``diag`` rows of its metrics.jsonl, see
    ``evaluation/diagnostics.py``), in step order: ``{"step": [...], key: [value or None, ...]}``
    for every key any row holds."""
    logged = sorted((r for r in rows if isinstance(r.get("diag"), dict)), key=lambda r: r["step"])
    keys = list(dict.fromkeys(key for r in logged for key in r["diag"]))
    series: dict[str, list] = {"step": [r["step"] for r in logged]}
    for key in keys:
        series[key] = [r["diag"].get(key) for r in logged]
    return series


def _present(xs: list, ys: list) -> tuple[list, list]:
    """The (x, y) pairs whose y is a number (a diagnostic undefined at a step is None)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _plot_diagnostics(path: Path, series: dict[str, list], current: Optional[dict[str, Any]],
                      current_step: Optional[int], title: str) -> dict[str, tuple[list, list]]:
    """Three panels over training steps: loss per image slot, paired gap with its +-SEM band,
    attention share on the current image per decoder block vs the uniform share; ``current``
    (values recomputed for a checkpoint) as stars at ``current_step``. Returns every plotted
    series as ``label -> (x, y)``, the checkpoint's under ``current/<key>``."""
    from matplotlib.figure import Figure

    steps = series.get("step", [])
    keys = list(dict.fromkeys([*series, *(current or {})]))
    x_now = current_step if current_step is not None else (steps[-1] if steps else 0)
    drawn: dict[str, tuple[list, list]] = {}
    fig = Figure(figsize=(13, 3.8), dpi=110)
    slots_ax, gap_ax, attn_ax = fig.subplots(1, 3)

    def line(ax, key: str, **style) -> None:
        xs, ys = _present(steps, series.get(key, []))
        if xs:
            ax.plot(xs, ys, **style)
            drawn[key] = (xs, ys)

    def star(ax, key: str, color=None) -> None:
        value = (current or {}).get(key)
        if isinstance(value, (int, float)):
            ax.plot([x_now], [value], marker="*", markersize=11, linestyle="none", color=color,
                    markeredgecolor="black", zorder=5)
            drawn[f"current/{key}"] = ([x_now], [value])

    slot_keys = sorted((k for k in keys if k.startswith("slot_loss/")),
                       key=lambda k: int(k.split("/")[1]))
    for i, key in enumerate(slot_keys):
        color = f"C{i % 10}"
        line(slots_ax, key, color=color, marker="o", markersize=3,
             label=f"slot {key.split('/')[1]}")
        star(slots_ax, key, color)
    slots_ax.set_title("loss per image slot (held-out, image clusters)", fontsize=9)
    slots_ax.set_ylabel("MSE per patch")

    line(gap_ax, "paired_gap_mean", color="C3", marker="o", markersize=3, label="mean")
    means, sems = series.get("paired_gap_mean", []), series.get("paired_gap_sem", [])
    both = [(x, m, e) for x, m, e in zip(steps, means, sems) if m is not None and e is not None]
    if both:
        xs = [x for x, _, _ in both]
        low, high = [m - e for _, m, e in both], [m + e for _, m, e in both]
        gap_ax.fill_between(xs, low, high, color="C3", alpha=0.25, label="± SEM")
        drawn["paired_gap_low"], drawn["paired_gap_high"] = (xs, low), (xs, high)
    gap = (current or {}).get("paired_gap_mean")
    if isinstance(gap, (int, float)):
        gap_ax.errorbar([x_now], [gap], yerr=[(current or {}).get("paired_gap_sem") or 0.0],
                        marker="*", markersize=11, color="C3", markeredgecolor="black", capsize=3)
        drawn["current/paired_gap_mean"] = ([x_now], [gap])
    gap_ax.axhline(0.0, color="0.5", linewidth=0.8)
    gap_ax.set_title("paired gap: loss(last slot) - loss(first slot)", fontsize=9)

    block_keys = sorted((k for k in keys if k.startswith("attn_share/block")),
                        key=lambda k: int(k[len("attn_share/block"):]))
    for i, key in enumerate(block_keys):
        line(attn_ax, key, color=f"C{i % 10}", linewidth=0.9, alpha=0.7,
             label=f"block {key[len('attn_share/block'):]}")
    line(attn_ax, "attn_share_mean", color="black", linewidth=2.0, label="mean over blocks")
    line(attn_ax, "attn_uniform_mean", color="black", linestyle="--", linewidth=1.2,
         label="uniform over visible keys")
    star(attn_ax, "attn_share_mean", "black")
    star(attn_ax, "attn_uniform_mean", "white")
    attn_ax.set_title("decoder attention on the current image", fontsize=9)
    attn_ax.set_ylabel("share of attention")

    undefined = not any(k in drawn for k in ("paired_gap_mean", "current/paired_gap_mean"))
    for ax, empty in ((gap_ax, undefined),
                      (attn_ax, not any(k.startswith(("attn_", "current/attn_")) for k in drawn))):
        if empty:
            ax.text(0.5, 0.5, "not defined here\n(K = 1, or no query sees its own image)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")
    for ax in (slots_ax, gap_ax, attn_ax):
        ax.set_xlabel("optimizer step" + ("; stars: this checkpoint" if current else ""))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return drawn


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _nanmean(t: Tensor) -> float:
    return float("nan") if torch.isnan(t).all() else torch.nanmean(t).item()


# ---------------------------------------------------------------------------- entry point

@torch.no_grad()
def visualize(checkpoint: str | Path, out_dir: str | Path, config: Any = None,
              num_sequences: int = 2, max_batches: int = 4, device: str | torch.device = "cpu",
              seed: int = 0, split: Optional[str] = None, first_clusters: int = 1,
              diagnostics: bool = True, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``predictions.png``, ``loss_per_position.png`` and ``loss_per_position.json``, and
    with ``diagnostics`` ``diagnostics.png`` / ``diagnostics.json`` (:func:`write_diagnostics`).

    ``checkpoint``: a STAR pretraining checkpoint (or a run directory). ``config``: a loaded
    ``RunConfig``, a config path / built-in name, or None for the run config saved in the
    checkpoint (the built-in ``pretrain/fashion_mnist`` for a checkpoint without one), with
    ``overrides`` (``section.key=value``) applied to a path, a name or None; only its ``data``
    section (and ``optim.batch_size``) is used, the model comes from the checkpoint. ``split``: the split the images come from (default: the
    data's eval split, images not trained on), read through the evaluation transform
    (``data.build``). Images are drawn at random (``seed``; a stream of shards: its first ones),
    ``max_batches`` batches of ``optim.batch_size`` images for the loss table; the predictions
    show the first ``num_sequences`` sequences of the first batch.

    Returns the written paths and the numbers: ``loss`` (the model's loss on those batches),
    ``loss_per_position`` (K x G, None where not predicted), ``first_cluster_loss_image0`` and
    ``first_cluster_loss_later_images`` (mean loss of the first ``first_clusters`` clusters of
    image 0 and of images 1..K-1; NaN if image 0's are never predicted or K = 1), and the same
    for the first row of clusters.
    """
    from ..data.build import sample_images, split_images
    from ..engine.config import RunConfig, load_config

    if num_sequences < 1 or max_batches < 1 or first_clusters < 1:
        raise ConfigError("num_sequences, max_batches and first_clusters must be >= 1")
    model, path, step, saved_run = _load_pretrain(checkpoint, device)
    cfg = model.cfg
    if isinstance(config, RunConfig):
        run_cfg = config
    elif config is not None:
        run_cfg = load_config(str(config), list(overrides), task="pretrain")
    elif saved_run:  # the data the checkpoint was trained on
        run_cfg = load_config(None, list(overrides), task="pretrain", base=saved_run)
    else:
        log.warning(f"{path} holds no run config: drawing images from the built-in "
                 "pretrain/fashion_mnist data; pass -c CONFIG for other data")
        run_cfg = load_config("pretrain/fashion_mnist", list(overrides), task="pretrain")
    data_cfg = run_cfg.data
    split = split or data_cfg.resolved_eval_split
    dataset = split_images(data_cfg, cfg, split)  # unrelated images, whatever data.sequence
    k = cfg.images_per_sequence
    batch = _batch_size(run_cfg.optim.batch_size, k)
    batch = max(batch, num_sequences * k)
    n = min(len(dataset), batch * max_batches)
    n -= n % k
    if n < num_sequences * k:
        raise DataError(f"the {split} split has {len(dataset)} images; at least "
                        f"{num_sequences * k} are needed for {num_sequences} sequences of {k}")
    images = sample_images(dataset, n, seed)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sums = torch.zeros(k, cfg.clusters_per_image, dtype=torch.float64)
    count, loss_sum, sep_sum, sep_count = 0, 0.0, 0.0, 0
    is_sep = seq.separator_segment_mask(cfg.clusters_per_image, cfg.separator_position,
                                        cfg.has_separator, k)[1:]
    first_out = None
    for start in range(0, n, batch):
        x = images[start:start + batch].to(device)
        out = model(x)
        b = x.shape[0] // k
        sums += loss_per_position(out.patch_loss, cfg).double().cpu() * b
        count += b
        loss_sum += out.loss.item() * b
        if is_sep.any():
            sep_sum += out.patch_loss[:, is_sep.to(out.patch_loss.device)].mean().item() * b
            sep_count += b
        if first_out is None:
            shown = x[: num_sequences * k]
            first_out = (shown.cpu(), out.pred[:num_sequences].float().cpu(),
                         model.target_pixels(shown).float().cpu())  # (S, T-1, c^2, P)
    table = (sums / count).float()  # (K, G), NaN stays NaN

    # -- predictions figure
    x, pred, target_raw = first_out
    pred_pixels = unnormalize_patches(pred, target_raw) if cfg.norm_target else pred
    show = data_cfg.spec.display
    rows = [("input", show(x)),
            ("predicted", show(segments_to_images(pred_pixels, cfg))),
            ("truth (targets)", show(segments_to_images(target_raw, cfg)))]
    pred_png = out_dir / "predictions.png"
    how = "pixels from normalised predictions with each true patch's mean/std" if cfg.norm_target \
        else "pixels"
    dashed = " ; red dashes: segment 0, never predicted" if unpredicted_clusters(cfg).any() else ""
    layout = (f"{cfg.separator} separators, {cfg.separator_position}" if cfg.has_separator
              else "no separators")
    _plot_predictions(pred_png, rows, cfg, num_sequences,
                      f"{path.name}: K={k} images per sequence, {layout}, {cfg.cluster_size}x"
                      f"{cfg.cluster_size} clusters\npredicted = {how}{dashed}")

    # -- loss table, figure and numbers
    g_first = min(first_clusters, cfg.clusters_per_image)
    first0 = _nanmean(table[0, :g_first])
    first_later = _nanmean(table[1:, :g_first]) if k > 1 else float("nan")
    row0 = _nanmean(table[0, : cfg.cluster_grid])
    row_later = _nanmean(table[1:, : cfg.cluster_grid]) if k > 1 else float("nan")
    loss_png = out_dir / "loss_per_position.png"
    _plot_loss(loss_png, table, cfg, f"{path.name} on {data_cfg.name} ({split}), "
               f"{count} sequences of K={k}")
    result: dict[str, Any] = dict(
        checkpoint=str(path), data=data_cfg.name, split=split, sequences=count,
        images_per_sequence=k, clusters_per_image=cfg.clusters_per_image,
        cluster_grid=cfg.cluster_grid, separator=cfg.separator,
        separator_position=cfg.separator_position if cfg.has_separator else None,
        norm_target=cfg.norm_target, loss=loss_sum / count,
        separator_target_loss=sep_sum / sep_count if sep_count else None,
        first_clusters=g_first,
        first_cluster_loss_image0=first0, first_cluster_loss_later_images=first_later,
        first_row_loss_image0=row0, first_row_loss_later_images=row_later,
        mean_loss_per_image=[_nanmean(r) for r in table],
        loss_per_position=table.tolist())
    json_path = out_dir / "loss_per_position.json"
    with open(json_path, "w") as f:
        json.dump({key: _nan_to_none(v) for key, v in result.items()}, f, indent=1)
    result.update(predictions=str(pred_png), loss_plot=str(loss_png), loss_json=str(json_path))
    if diagnostics:
        result.update(write_diagnostics(model, path, step, run_cfg, out_dir))
    return result


def write_diagnostics(model, path: Path, step: Optional[int], run_cfg: Any, out_dir: Path
                      ) -> dict[str, Any]:
    """``diagnostics.png`` and ``diagnostics.json``: the cross-image diagnostics the run logged
    over its steps (``metrics.jsonl`` next to the checkpoint, if any) and their values for this
    checkpoint, recomputed on the held-out batch ``run_cfg`` describes (``data`` and
    ``run.diag_images``, as in training: the same numbers as the run's row at this step when
    ``run_cfg`` is the run's config). Returns the current values, the plotted series and paths.
    """
    from ..data.build import held_out_images, held_out_source
    from ..engine.metrics import read_metrics
    from ..evaluation.diagnostics import cross_image_diagnostics

    cfg = model.cfg
    held_out = held_out_images(run_cfg.data, cfg, run_cfg.run.diag_images)
    per_forward = max(1, run_cfg.optim.batch_size // cfg.images_per_sequence)
    current = cross_image_diagnostics(model, held_out, per_forward)
    metrics = path.parent / "metrics.jsonl"
    series = diagnostic_series(read_metrics(metrics)) if metrics.is_file() else {"step": []}
    png = out_dir / "diagnostics.png"
    drawn = _plot_diagnostics(png, series, current, step,
                              f"{path.name}: cross-image diagnostics on {len(held_out)} held-out "
                              f"images ({held_out_source(run_cfg.data)}), K="
                              f"{cfg.images_per_sequence}; lines: logged in training")
    json_path = out_dir / "diagnostics.json"
    with open(json_path, "w") as f:
        json.dump(dict(checkpoint=str(path), step=step, current=current, logged=series), f,
                  indent=1)
    return dict(diagnostics=current, diagnostics_step=step, diagnostics_series=drawn,
                diagnostics_plot=str(png), diagnostics_json=str(json_path))
