"""Pure functions that turn images into STAR's packed sequences and back.

Vocabulary (see the README's layout table):
- patch: p x p pixels of C channels, flattened as (p, p, C) -> p*p*C values (MAE's order);
- cluster: c x c spatially adjacent patches, the unit of autoregressive prediction;
- separator: one cluster-sized segment inserted between images;
- segment: a cluster or a separator; a packed sequence is T segments of c^2 tokens each.

Nothing here holds parameters: every function maps tensors or sizes to tensors, so each can be
tested on its own (round trips, counts, causality).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

# ---------------------------------------------------------------------------- patches

def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), p*p*C), patches in raster order."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
    x = images.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, p, w, p)
    x = torch.einsum("bchpwq->bhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); the inverse of :func:`patchify`."""
    b, n, d = patches.shape
    h, w = grid
    p = patch_size
    if n != h * w or d != p * p * in_chans:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not match grid {grid}, "
                         f"patch_size={p}, in_chans={in_chans}")
    x = patches.reshape(b, h, w, p, p, in_chans)
    x = torch.einsum("bhwpqc->bchpwq", x)  # (B, C, h, p, w, p)
    return x.reshape(b, in_chans, h * p, w * p)


# ---------------------------------------------------------------------------- orders

def cluster_order(grid: tuple[int, int], cluster_size: int) -> Tensor:
    """Cluster-priority scan: ``order[k]`` is the raster index of the token at new position k.

    Clusters are visited in raster order over the cluster grid and tokens in raster order inside
    a cluster, so every cluster is finished before the next starts. Returns (h*w,) int64.
    """
    h, w = grid
    c = cluster_size
    if h % c or w % c:
        raise ValueError(f"cluster_size={c} does not divide the patch grid {h}x{w}")
    gw = w // c
    k = torch.arange(h * w)
    q, j = k // (c * c), k % (c * c)  # cluster index, index inside the cluster
    row = (q // gw) * c + j // c
    col = (q % gw) * c + j % c
    return row * w + col


def inverse_order(order: Tensor) -> Tensor:
    """``inv`` with ``x[:, order][:, inv] == x``: maps a permuted sequence back."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def direction_orders(grid: tuple[int, int], directions: int,
                     class_token_index: Optional[int] = None) -> list[Tensor]:
    """Scan orders for a bidirectional or four-directional mixer over a raster sequence.

    Direction 0 is the raster order itself, 1 its reverse, 2 the transposed grid (column-major),
    3 the reverse of that. With a class token at ``class_token_index`` the sequence holds h*w + 1
    tokens: patches keep their permutation and the class token keeps its slot among them in the
    transposed order (so with ``middle`` it stays in the middle of every scan).
    Returns ``directions`` tensors of shape (L,), each a permutation of range(L).
    """
    h, w = grid
    raster = torch.arange(h * w)
    transposed = raster.reshape(h, w).t().reshape(-1)
    base = [raster, transposed][: (directions + 1) // 2]
    if class_token_index is not None:
        def with_cls(o: Tensor) -> Tensor:
            shifted = o + (o >= class_token_index).long()  # patch indices in the L+1 sequence
            cls = torch.tensor([class_token_index])
            return torch.cat([shifted[:class_token_index], cls, shifted[class_token_index:]])
        base = [with_cls(o) for o in base]
    orders: list[Tensor] = []
    for o in base:
        orders += [o, o.flip(0)]
    return orders[:directions]


# ---------------------------------------------------------------------------- separators

def separator_patches(kind: str, cluster_size: int, patch_dim: int) -> Tensor:
    """Pixel-space separator cluster, (c^2, p*p*C) float32, tokens in raster order in the cluster.

    ``zeros``: every patch 0; ``ones``: every patch 1; ``identity``: the c patches on the
    cluster's diagonal (row == column) are 1, the others 0. ``embedding`` separators live in
    token space and have no pixels: their placeholder here is zeros.
    """
    c = cluster_size
    if kind in ("zeros", "embedding"):
        return torch.zeros(c * c, patch_dim)
    if kind == "ones":
        return torch.ones(c * c, patch_dim)
    if kind == "identity":
        diag = torch.eye(c).reshape(c * c, 1)  # 1 where row == column in the c x c patch grid
        return diag.expand(c * c, patch_dim).clone()
    raise ValueError(f"invalid separator kind {kind!r}; allowed: 'identity', 'zeros', 'ones', "
                     "'embedding'")


# ---------------------------------------------------------------------------- layouts

def segment_layout(clusters_per_image: int, separator_position: str, has_separator: bool = True
                   ) -> list[int]:
    """Segments of one image in sequence order: g in [0, G) is cluster g, G is the separator.

    SC: S c0 .. c{G-1};  CS: c0 .. c{G-1} S;  SCS: S c0 S c1 .. S c{G-1};
    CSC: c0 S c1 S .. c{G-1} S;  no separator: c0 .. c{G-1}.
    """
    g = clusters_per_image
    sep = g
    clusters = list(range(g))
    if not has_separator:
        return clusters
    if separator_position == "SC":
        return [sep] + clusters
    if separator_position == "CS":
        return clusters + [sep]
    if separator_position == "SCS":
        return [s for c in clusters for s in (sep, c)]
    if separator_position == "CSC":
        return [s for c in clusters for s in (c, sep)]
    raise ValueError(f"invalid separator_position {separator_position!r}; "
                     "allowed: 'SC', 'CS', 'SCS', 'CSC'")


def pack_segments(image_segments: Tensor, separator: Optional[Tensor], images_per_sequence: int,
                  layout: Sequence[int] | Tensor) -> Tensor:
    """Interleave per-image segments with separators and join K images into one sequence.

    image_segments: (B*K, G, *S), the G clusters of each image in cluster-priority order;
    separator: (*S) or None (then ``layout`` must not reference index G);
    layout: from :func:`segment_layout`, as a list or as an index tensor on the segments'
    device (models keep it as a buffer, so no host-to-device copy per call). Returns (B, K * len(layout), *S): image k of sequence
    b is ``image_segments[b * K + k]``.
    """
    bk, g = image_segments.shape[:2]
    k = images_per_sequence
    if bk % k:
        raise ValueError(f"batch of {bk} images is not divisible by images_per_sequence={k}")
    if separator is not None:
        sep = separator.to(image_segments.dtype).expand(bk, 1, *image_segments.shape[2:])
        image_segments = torch.cat([image_segments, sep], dim=1)  # (B*K, G+1, *S)
    index = layout if isinstance(layout, Tensor) else torch.tensor(layout, device=image_segments.device)
    seq = image_segments.index_select(1, index)  # (B*K, S_img, *S)
    return seq.reshape(bk // k, k * seq.shape[1], *seq.shape[2:])  # (B, T, *S)


def separator_segment_mask(clusters_per_image: int, separator_position: str,
                           has_separator: bool, images_per_sequence: int) -> Tensor:
    """(T,) bool, True where the packed sequence holds a separator."""
    layout = segment_layout(clusters_per_image, separator_position, has_separator)
    per_image = torch.tensor([s == clusters_per_image for s in layout])
    return per_image.repeat(images_per_sequence)


def segment_slots(clusters_per_image: int, separator_position: str, has_separator: bool,
                  images_per_sequence: int) -> Tensor:
    """(T,) int64: the image slot k in [0, K) that each segment of a packed sequence belongs to.

    A sequence is K copies of one image's layout (:func:`segment_layout`), so segment t belongs
    to slot ``t // len(layout)``, separators included: SC's separator opens its image, CS's
    closes it, SCS / CSC interleave one per cluster. E.g. G = 2, K = 2: SC -> 0 0 0 1 1 1;
    CS -> 0 0 0 1 1 1 (the separator at t = 2 closes image 0); SCS -> 0 0 0 0 1 1 1 1;
    none -> 0 0 1 1. Target j of the model (segment j + 1) belongs to slot ``slots[j + 1]``.
    """
    layout = segment_layout(clusters_per_image, separator_position, has_separator)
    return torch.arange(images_per_sequence).repeat_interleave(len(layout))


def cluster_segment_index(image: int, cluster: int, clusters_per_image: int,
                          separator_position: str, has_separator: bool = True) -> int:
    """Segment index of image ``image``'s cluster ``cluster`` in a packed sequence.

    SC: k*(G+1) + 1 + g;  CS: k*(G+1) + g;  SCS: k*2G + 2g + 1;  CSC: k*2G + 2g;  none: k*G + g.
    """
    layout = segment_layout(clusters_per_image, separator_position, has_separator)
    return image * len(layout) + layout.index(cluster)


# ---------------------------------------------------------------------------- masks

def block_causal_mask(num_segments: int, segment_len: int, device=None) -> Tensor:
    """Decoder mask, (S*l, S*l) bool, True = may attend.

    Row block t holds the queries that predict segment t+1; column block s holds the encoder
    outputs of segment s. Queries see every token of segments 0..t (bidirectional inside a
    segment, causal across segments, across image boundaries too) and nothing later.
    """
    seg = torch.arange(num_segments, device=device).repeat_interleave(segment_len)  # (S*l,)
    return seg[None, :] <= seg[:, None]


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalise each patch (last dim) by its own mean and variance, as MAE's norm_pix_loss."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()
