"""Cross-image diagnostics of a STAR pretraining model on a fixed batch of held-out images.

Does the model reset at a separator, and does it use the images before the current one? On the
same forward passes, :func:`cross_image_diagnostics` measures

* ``slot_loss/k``: the mean per-patch MSE of the image-cluster targets of the image in slot k
  (k = 0..K-1; separator targets excluded);
* ``paired_gap_mean`` / ``paired_gap_sem``: per image, its loss when it comes last (slot K-1,
  after K-1 other images) minus its loss when it comes first (slot 0), the same K-1 other
  images filling the other slots in the same order in both placements; mean and standard error
  over the images (the M differences taken as independent, though the images of a group
  share their fillers). Positive: the earlier images hurt (no reset at the separator);
  negative: they help (cross-image context is used);
* ``attn_share/block{i}``: for the decoder queries of image k >= 1's cluster targets, the share
  of block i's softmax attention (averaged over heads) on keys of image k itself (its
  separator(s) and clusters visible under the block-causal mask); ``attn_uniform_mean`` is the
  share uniform attention over the visible keys would give, ``attn_ratio/block{i}`` the ratio.
  Queries with no key of their own image in view (the first cluster of an image in the CS, CSC
  and separator-free layouts) are left out.

The held-out sequences. The M images are cut into M / K groups of K, and each group is packed in
its K cyclic rotations: rotation j holds the group's images j, j+1, ..., j-1 (mod K) in slots
0..K-1 (:func:`rotation_index`). So every image sits in every slot exactly once (the slot losses
compare the same images), and image j is first in rotation j and last in rotation j+1, with the
group's other images in the same order in the other slots of both: the paired placements, at
one sequence per image. M images cost M sequences, M x K images through the model, forward only.

For K = 1 the gap and the attention shares are undefined: their keys are None (per block: left
out). Nothing here draws from a global random generator (a forked one at most) or changes the
model: it runs in eval mode without gradients and is put back in its own mode.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import sequence as seq
from ..config import StarConfig
from ..errors import ConfigError
from ..models.pretrain import StarPretrain
from .config import DataConfig

__all__ = ["rotation_index", "TargetSlots", "target_slots", "per_slot_losses", "own_image_keys",
           "cross_image_diagnostics", "summary_line", "held_out_source", "held_out_images",
           "check_diagnostics_config", "TrainingDiagnostics", "HELD_OUT_SEED"]

log = logging.getLogger("star_mamba")

HELD_OUT_SEED = 0
"""Seed of the held-out images' draw: fixed, so that runs with different ``run.seed`` are
diagnosed on the same images."""


# ---------------------------------------------------------------------------- pure tables

def rotation_index(num_images: int, images_per_sequence: int) -> Tensor:
    """(num_images, K) int64: sequence r = g*K + j holds, in slot i, image g*K + (j + i) % K.

    Image g*K + j is in slot 0 of sequence g*K + j and in slot K-1 of sequence g*K + (j+1) % K;
    slots 1..K-1 of the first hold the same images, in the same order, as slots 0..K-2 of the
    second. ``num_images`` must be a multiple of K.
    """
    k = images_per_sequence
    if num_images <= 0 or num_images % k:
        raise ValueError(f"{num_images} images are not a positive multiple of "
                         f"images_per_sequence={k}")
    g, j, i = torch.meshgrid(torch.arange(num_images // k), torch.arange(k), torch.arange(k),
                             indexing="ij")
    return (g * k + (j + i) % k).reshape(num_images, k)


class TargetSlots(NamedTuple):
    """Where the T-1 targets of a packed sequence (segments 1..T-1) belong."""

    slot: Tensor  # (T-1,) int64: image slot of target j (segment j + 1)
    is_cluster: Tensor  # (T-1,) bool: an image cluster (False: a separator)


def target_slots(cfg: StarConfig) -> TargetSlots:
    """The slot and kind of every target of ``cfg``'s packed sequences."""
    args = (cfg.clusters_per_image, cfg.separator_position, cfg.has_separator,
            cfg.images_per_sequence)
    slots = seq.segment_slots(*args)  # (T,)
    is_sep = seq.separator_segment_mask(*args)  # (T,)
    return TargetSlots(slots[1:], ~is_sep[1:])


def per_slot_losses(pred: Tensor, target: Tensor, cfg: StarConfig
                    ) -> tuple[Tensor, Optional[Tensor]]:
    """pred, target (B, T-1, c^2, P) -> ((B, K) mean per-patch MSE of each slot's image-cluster
    targets, (B,) mean per-patch MSE of the separator targets or None without separators)."""
    per_target = (pred.float() - target.float()).pow(2).mean(dim=(-1, -2))  # (B, T-1)
    slots = target_slots(cfg)
    onehot = torch.nn.functional.one_hot(slots.slot, cfg.images_per_sequence).float()  # (T-1, K)
    onehot = onehot * slots.is_cluster[:, None]  # separator targets excluded
    per_slot = per_target @ (onehot / onehot.sum(0)).to(per_target.device)  # (B, K)
    is_sep = ~slots.is_cluster.to(per_target.device)
    sep = per_target[:, is_sep].mean(dim=1) if is_sep.any() else None  # (B,)
    return per_slot, sep


def own_image_keys(cfg: StarConfig, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Which decoder keys belong to the query's own image, and which queries are measured.

    ``mask``: the decoder's (L, L) bool mask (True = may attend), L = (T-1) * c^2 (query row r
    predicts a token of target r // c^2; key column s is an encoder token of segment s // c^2).
    Returns ``own`` (L, L) bool: visible keys in the slot of the query's target, and
    ``measured`` (L,) bool: queries of image-cluster targets in slots >= 1 with an own key in view.
    """
    c2 = cfg.tokens_per_segment
    slots = target_slots(cfg)
    key_slot = seq.segment_slots(cfg.clusters_per_image, cfg.separator_position,
                                 cfg.has_separator, cfg.images_per_sequence)[:-1]  # (T-1,)
    query_slot = slots.slot.repeat_interleave(c2).to(mask.device)  # (L,)
    key_slot = key_slot.repeat_interleave(c2).to(mask.device)  # (L,)
    own = (query_slot[:, None] == key_slot[None, :]) & mask  # (L, L)
    is_cluster = slots.is_cluster.repeat_interleave(c2).to(mask.device)
    measured = is_cluster & (query_slot >= 1) & own.any(dim=1)
    return own, measured


# ---------------------------------------------------------------------------- forward passes

@contextlib.contextmanager
def _attention_inputs(model: StarPretrain) -> Iterator[list[Optional[tuple]]]:
    """Record what each decoder block's cross-attention receives: a list with, per block, its
    last call's (x (B, L, Dd), memory (B, L, Dd), mask (L, L))."""
    seen: list[Optional[tuple]] = [None] * len(model.decoder.blocks)
    hooks = []
    for i, block in enumerate(model.decoder.blocks):
        def keep(module, args, i=i):
            seen[i] = args
        hooks.append(block.attn.register_forward_pre_hook(keep))
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _mean_sem(x: Tensor) -> tuple[float, float]:
    n = x.numel()
    return x.mean().item(), (x.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan"))


@torch.no_grad()
def cross_image_diagnostics(model: StarPretrain, images: Tensor, batch_size: int = 32,
                            amp_dtype: Optional[torch.dtype] = None) -> dict[str, Optional[float]]:
    """The cross-image diagnostics of ``model`` on held-out ``images`` (M, C, H, W), M a multiple
    of K (see the module's docstring for what each number means).

    ``batch_size``: sequences per forward pass; ``amp_dtype``: autocast dtype of the forward
    passes (None: float32; attention weights are recomputed in float32 either way). Returns flat
    keys: ``loss`` (the model's own loss over the M rotated sequences), ``slot_loss/0`` ..
    ``slot_loss/{K-1}``, ``separator_loss`` (mean MSE of the separator targets; None when no
    target is a separator), ``paired_gap_mean``, ``paired_gap_sem``, ``attn_share/block{i}``,
    ``attn_ratio/block{i}``, ``attn_share_mean``, ``attn_uniform_mean``, ``attn_ratio_mean``
    (None, or left out per block, when K = 1), and ``images`` (M). Deterministic for a given
    model, images and ``batch_size``; the model is left in its own train/eval mode.
    """
    if not isinstance(model, StarPretrain):
        raise TypeError(f"cross_image_diagnostics needs a StarPretrain (unwrapped from DDP or "
                        f"torch.compile), got {type(model).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}; expected a positive number of sequences")
    model.check_images(images)
    cfg = model.cfg
    k, m = cfg.images_per_sequence, images.shape[0]
    device = next(model.parameters()).device
    rotations = rotation_index(m, k)  # (M, K): M sequences
    per_image = torch.zeros(m, k, dtype=torch.float64)  # loss of image i in slot s
    loss_sum, sep_sum = 0.0, 0.0
    share_sum = torch.zeros(len(model.decoder.blocks), dtype=torch.float64)
    uniform_sum, measured_count = 0.0, 0
    was_training = model.training
    model.eval()
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked):
            for start in range(0, m, batch_size):
                rows = rotations[start:start + batch_size]  # (B, K)
                x = images[rows.reshape(-1)].to(device)  # (B*K, C, H, W)
                autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                          enabled=amp_dtype is not None)
                with _attention_inputs(model) as seen, autocast:
                    out = model(x)
                per_slot, sep = per_slot_losses(out.pred, out.target, cfg)  # (B, K), (B,)
                per_image[rows, torch.arange(k)] = per_slot.double().cpu()
                loss_sum += out.loss.float().item() * rows.shape[0]
                if sep is not None:
                    sep_sum += sep.double().sum().item()
                if k > 1:
                    shares, uniform, count = _attention_sums(model, seen)
                    share_sum += shares
                    uniform_sum += uniform
                    measured_count += count
    finally:
        model.train(was_training)
    result: dict[str, Optional[float]] = {"loss": loss_sum / m}
    for s in range(k):
        result[f"slot_loss/{s}"] = per_image[:, s].mean().item()
    has_sep_targets = not bool(target_slots(cfg).is_cluster.all())  # none, or K = 1 with SC
    result["separator_loss"] = sep_sum / m if has_sep_targets else None
    result.update(_gap_and_attention(per_image, share_sum, uniform_sum, measured_count))
    result["images"] = m
    return result


def _attention_sums(model: StarPretrain, seen: list[tuple]) -> tuple[Tensor, float, int]:
    """From one forward pass's recorded decoder inputs (:func:`_attention_inputs`): per block,
    the own-image attention share summed over every sequence's measured queries, (blocks,)
    float64; the uniform share summed the same way; and the number of (sequence, query) pairs."""
    mask = seen[0][2]  # (L, L): the same for every block
    own, measured = own_image_keys(model.cfg, mask)
    own = own[measured]  # (Q, L) the measured queries' own keys
    batch = seen[0][0].shape[0]
    uniform = (own.sum(1) / mask[measured].sum(1)).double().sum().item() * batch
    shares = torch.zeros(len(seen), dtype=torch.float64)
    for i, (block, (x, memory, _)) in enumerate(zip(model.decoder.blocks, seen)):
        probs = block.attn.attention_probs(x[:, measured].float(), memory.float(),
                                           mask[measured])  # (B, h, Q, L)
        shares[i] = (probs.mean(dim=1) * own).sum(dim=-1).double().sum().item()  # over (B, Q)
    return shares, uniform, own.shape[0] * batch


def _gap_and_attention(per_image: Tensor, share_sum: Tensor, uniform_sum: float,
                       count: int) -> dict[str, Optional[float]]:
    """The paired gap from the (M, K) per-image slot losses, and the attention summaries from
    the sums over ``count`` measured queries (None where undefined: K = 1, or no query)."""
    out: dict[str, Optional[float]] = dict.fromkeys(
        ("paired_gap_mean", "paired_gap_sem", "attn_share_mean", "attn_uniform_mean",
         "attn_ratio_mean"))
    if per_image.shape[1] > 1:
        gaps = per_image[:, -1] - per_image[:, 0]  # (M,) last slot minus first, per image
        out["paired_gap_mean"], out["paired_gap_sem"] = _mean_sem(gaps)
    if count == 0:
        return out
    shares = share_sum / count  # (blocks,)
    uniform = uniform_sum / count
    for i, s in enumerate(shares.tolist()):
        out[f"attn_share/block{i}"] = s
        out[f"attn_ratio/block{i}"] = s / uniform
    out["attn_share_mean"] = shares.mean().item()
    out["attn_uniform_mean"] = uniform
    out["attn_ratio_mean"] = out["attn_share_mean"] / uniform
    return out


def summary_line(values: dict[str, Any]) -> str:
    """One log line of :func:`cross_image_diagnostics`' numbers (the per-block ones left out)."""
    slots = [v for key, v in values.items() if key.startswith("slot_loss/")]
    parts = ["slot loss " + " ".join(f"{v:.4f}" for v in slots)]
    if values.get("paired_gap_mean") is not None:
        parts.append(f"paired gap {values['paired_gap_mean']:+.4f} "
                     f"± {values['paired_gap_sem']:.4f}")
    if values.get("attn_share_mean") is not None:
        parts.append(f"attention on own image {values['attn_share_mean']:.3f} vs uniform "
                     f"{values['attn_uniform_mean']:.3f} (x{values['attn_ratio_mean']:.2f})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- held-out images

def _eval_images(data: DataConfig, model: StarConfig, extra: int) -> tuple[Dataset, int]:
    """The dataset the held-out images come from, and the first index that may be used."""
    from ..data import build_dataset
    from ..data.transforms import build_eval_transform

    split = data.resolved_eval_split
    if data.name == "fashion_mnist":
        return build_dataset("fashion_mnist", root=data.root, split=split, img_size=model.img_size,
                             in_chans=model.in_chans, augment=False, download=data.download), 0
    if data.name == "imagefolder":
        if data.root is None:
            raise ConfigError("invalid config: data.root is required for data.name='imagefolder'")
        if model.in_chans != 3:
            raise ConfigError(f"invalid config: model.in_chans={model.in_chans} but ImageFolder "
                              "images are RGB (3 channels)")
        return build_dataset("imagefolder", root=data.root, split=split,
                             transform=build_eval_transform(model.img_size, data.crop_pct),
                             max_bad_fraction=data.max_bad_fraction), 0
    if data.name == "synthetic":  # no split: the generator's images after the training ones
        first = data.synthetic_images
        return build_dataset("synthetic", num_images=first + extra, img_size=model.img_size,
                             in_chans=model.in_chans), first
    raise ConfigError(f"invalid config: data.name={data.name!r}; allowed: 'fashion_mnist', "
                      "'imagefolder', 'synthetic'")


def held_out_source(data: DataConfig) -> str:
    """Where :func:`held_out_images` takes its images from, in words."""
    if data.name == "synthetic":
        return f"synthetic images after the {data.synthetic_images} training ones"
    return f"{data.name} {data.resolved_eval_split!r} split"


def check_diagnostics_config(num_images: int, model: StarConfig) -> None:
    """``run.diag_images`` must hold at least one sequence of K images."""
    k = model.images_per_sequence
    if num_images < k:
        raise ConfigError(f"invalid config: run.diag_images={num_images} is fewer than "
                          f"model.images_per_sequence={k}; raise it or set run.diag_every=0")


def held_out_images(data: DataConfig, model: StarConfig, num_images: int,
                    seed: int = HELD_OUT_SEED, allow_fewer: bool = False) -> Tensor:
    """The fixed batch of the diagnostics: (M, C, H, W) float32 images never trained on, M the
    largest multiple of K not above ``num_images`` (``run.diag_images``); with ``allow_fewer``,
    not above the images the eval split holds either (else too few raise ``ConfigError``).

    Fashion-MNIST: the eval split (``data.eval_split``, default ``test``), padded, no
    augmentation; ImageFolder: the eval split (default ``val``) with the evaluation transform
    (resize, centre crop); synthetic: the images the generator makes after the
    ``data.synthetic_images`` training ones. M of them are drawn without replacement by a
    private generator seeded with ``seed``, so the batch is the same on every call, rank and
    run; no global random generator is touched. The images are unrelated to each other whatever
    ``data.sequence`` the run packs (the paired gap is defined on unrelated images).
    """
    check_diagnostics_config(num_images, model)
    k = model.images_per_sequence
    m = num_images - num_images % k
    dataset, first = _eval_images(data, model, m)
    available = len(dataset) - first
    if available < m and (not allow_fewer or available < k):
        raise ConfigError(f"invalid config: run.diag_images={num_images} but the {data.name} eval "
                          f"split holds {available} images; lower it or set run.diag_every=0")
    m = min(m, available - available % k)
    picks = first + torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:m]
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in picks.tolist()]).float()


# ---------------------------------------------------------------------------- in training

class TrainingDiagnostics:
    """What pretraining runs every ``run.diag_every`` steps, on rank 0: model -> the numbers of
    :func:`cross_image_diagnostics` (logged as one line too), or None when there are no
    held-out images.

    The held-out batch is read at the first call, so a run that ends before never reads it and
    only rank 0 does. Diagnostics are an aid: when the eval split cannot be read (say an
    ImageFolder tree without ``val/``) the run warns once and trains on without them; an eval
    split smaller than ``run.diag_images`` is used whole (warned).
    """

    def __init__(self, data: DataConfig, model: StarConfig, num_images: int, batch_size: int,
                 amp_dtype: Optional[torch.dtype] = None):
        self.data, self.model_cfg, self.num_images = data, model, num_images
        self.batch_size, self.amp_dtype = batch_size, amp_dtype
        self.images: Optional[Tensor] = None
        self.unavailable = False

    def _load(self) -> None:
        try:
            with torch.random.fork_rng(devices=[]):  # reading images draws nothing; in case
                self.images = held_out_images(self.data, self.model_cfg, self.num_images,
                                              allow_fewer=True)
        except (FileNotFoundError, ValueError) as e:  # data, not config: that was checked
            self.unavailable = True
            log.warning(f"cross-image diagnostics off for this run: no held-out images "
                        f"({' '.join(str(e).split())}); set run.diag_every=0 to silence this")
            return
        wanted = self.num_images - self.num_images % self.model_cfg.images_per_sequence
        if len(self.images) < wanted:
            log.warning(f"run.diag_images={self.num_images} but only {len(self.images)} held-out "
                        f"images can be used ({held_out_source(self.data)})")

    def __call__(self, model: StarPretrain) -> Optional[dict[str, Optional[float]]]:
        if self.images is None and not self.unavailable:
            self._load()
        if self.unavailable:
            return None
        start = time.perf_counter()
        values = cross_image_diagnostics(model, self.images, self.batch_size, self.amp_dtype)
        log.info(f"diagnostics on {values['images']} held-out images "
                 f"({time.perf_counter() - start:.1f}s): {summary_line(values)}")
        return values
