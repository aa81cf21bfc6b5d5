"""Features of a frozen classifier backbone, and flattened pixels, for the probes.

:func:`extract_features`: the backbone (eval mode, no grad) over a dataset, once; pooled tokens
of the last block, or the concatenation of several block taps (``probe.layers``), pooled as
``probe.pool`` says. :func:`dataset_pixels`: the raw-pixel baseline's "features".
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import ConfigError
from ..models.classifier import StarClassifier
from .config import POOLS


def _pool(tokens: Tensor, model: StarClassifier, pool: str) -> Tensor:
    """(B, L, D) tokens of the classifier's sequence -> (B, D): patch-token mean or class token."""
    i = model.cls_index
    if pool == "cls":
        return tokens[:, i]
    if i is None:
        return tokens.mean(dim=1)
    return torch.cat([tokens[:, :i], tokens[:, i + 1:]], dim=1).mean(dim=1)  # patch tokens only


def check_layers(layers: Sequence[int], depth: int) -> list[int]:
    layers = [int(t) for t in layers]
    if not layers or any(not 1 <= t <= depth for t in layers):
        raise ValueError(f"invalid layers={layers}: 1-based block indices in 1..{depth} expected")
    return layers


@torch.no_grad()
def extract_features(model: StarClassifier, dataset: Dataset, batch_size: int = 256,
                     device: Optional[Union[str, torch.device]] = None,
                     layers: Optional[Sequence[int]] = None, pool: str = "avg",
                     amp_dtype: Optional[torch.dtype] = None, num_workers: int = 0,
                     norm: bool = True, progress: bool = True, desc: str = "features"
                     ) -> tuple[Tensor, Tensor]:
    """The frozen backbone's pooled features of every image of ``dataset``, in dataset order.

    ``layers=None``: the final-normed output of the last block (``model.forward_features``),
    pooled. ``layers``: 1-based block indices; each block's output is passed through the final
    norm (``norm=True``, so ``layers=[depth]`` equals ``layers=None``), pooled, and the pooled
    taps are concatenated in the order given (F = len(layers) x embed_dim). ``pool``: ``avg``
    (mean over patch tokens, the class token left out) or ``cls`` (the class token; the model
    needs one). The model runs in eval mode under ``no_grad`` on ``device`` (default: where its
    parameters are) and is left as it was (training flag, ``requires_grad``, device).
    Returns (features float32 (n, F) on the CPU, labels int64 (n,)).
    """
    if pool not in POOLS:
        raise ValueError(f"invalid pool={pool!r}; allowed values are {', '.join(POOLS)}")
    if pool == "cls" and model.cls_index is None:
        raise ConfigError("invalid config: probe.pool='cls' needs a model with a class token "
                          "(class_token 'middle' or 'end'); this one has none: use probe.pool=avg")
    depth = len(model.backbone.blocks)
    layers = None if layers is None else check_layers(layers, depth)
    first = next(model.parameters())
    device = torch.device(device) if device is not None else first.device
    if first.device != device:
        raise ValueError(f"the model is on {first.device} but device={device}; move it first")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                if layers is None:  # pooled in float32 under autocast too
                    f = _pool(model.forward_features(images).float(), model, pool)
                else:
                    f = _tap_features(model, images, layers, pool, norm)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.int64).reshape(-1))
    finally:
        model.train(was_training)
    dim = model.num_features * (1 if layers is None else len(layers))
    if not feats:
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


def _tap_features(model: StarClassifier, images: Tensor, layers: list[int], pool: str,
                  norm: bool) -> Tensor:
    """Pooled outputs of the 1-based blocks ``layers``, concatenated in that order: (B, len * D)."""
    unique = sorted(set(layers))
    taps = model.forward_intermediates(images, indices=[t - 1 for t in unique], norm=norm,
                                       return_prefix_tokens=True, output_fmt="NLC",
                                       stop_early=True, intermediates_only=True)
    pooled = {}
    for t, (patches, cls) in zip(unique, taps):  # patches (B, N, D), cls (B, 1, D) or None
        pooled[t] = cls[:, 0].float() if pool == "cls" else patches.float().mean(dim=1)
    return torch.cat([pooled[t] for t in layers], dim=1)


def dataset_pixels(dataset: Dataset, batch_size: int = 512, num_workers: int = 0,
                   progress: bool = False) -> tuple[Tensor, Tensor]:
    """Flattened images (n, C*H*W) float32 and labels (n,) int64 of a dataset, in order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    xs, ys = [], []
    for images, targets in tqdm(loader, desc="pixels", disable=not progress, leave=False):
        xs.append(images.reshape(images.shape[0], -1).float())
        ys.append(torch.as_tensor(targets, dtype=torch.int64).reshape(-1))
    return torch.cat(xs), torch.cat(ys)


