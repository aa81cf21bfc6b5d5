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
import math
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from .. import sequence as seq
from ..config import StarConfig
from ..models.pretrain import StarPretrain

__all__ = ["rotation_index", "TargetSlots", "target_slots", "per_slot_losses", "own_image_keys",
           "cross_image_diagnostics", "summary_line"]

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


def per_slot_losses(patch_loss: Tensor, cfg: StarConfig) -> tuple[Tensor, Optional[Tensor]]:
    """``PretrainOutput.patch_loss`` (B, T-1, c^2) -> ((B, K) mean per-patch MSE of each slot's
    image-cluster targets, (B,) mean per-patch MSE of the separator targets or None without
    separators)."""
    per_target = patch_loss.float().mean(dim=-1)  # (B, T-1)
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
                per_slot, sep = per_slot_losses(out.patch_loss, cfg)  # (B, K), (B,)
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


