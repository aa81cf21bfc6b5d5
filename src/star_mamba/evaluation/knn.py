"""k-nearest-neighbour classification of frozen features: DINO's weighted vote over cosine
similarities (or a plain majority)."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int = 20,
                temperature: Optional[float] = 0.07, metric: str = "cosine",
                num_classes: Optional[int] = None, batch_size: int = 1024,
                device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """k-NN labels of ``test_x`` (n_test,), by DINO's weighted vote.

    ``metric``: ``cosine`` (similarity of L2-normalised rows) or ``euclidean`` (similarity = minus
    the distance). Each of the k most similar training rows votes for its label with weight
    exp(sim / temperature) (``temperature=None``: weight 1, plain majority; ties go to the lower
    class index). Chunked over ``batch_size`` test rows, so memory is O(batch_size x n_train).
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"invalid metric={metric!r}; allowed values are cosine, euclidean")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"invalid temperature={temperature}: must be > 0 (or None: majority)")
    device = torch.device(device) if device is not None else torch.device("cpu")
    train = train_x.to(device, torch.float32)
    labels = train_y.long().to(device)
    if num_classes is None:
        num_classes = int(labels.max().item()) + 1
    if metric == "cosine":
        train = F.normalize(train, dim=1)
    k = min(k, len(train))
    out = []
    for start in range(0, len(test_x), batch_size):
        q = test_x[start:start + batch_size].to(device, torch.float32)
        if metric == "cosine":
            sim = F.normalize(q, dim=1) @ train.T  # (b, n_train)
        else:
            sim = -torch.cdist(q, train)
        top, idx = sim.topk(k, dim=1)  # (b, k), most similar first
        if temperature is None:
            weights = torch.ones_like(top)
        else:  # shifted by the best similarity: the same vote, no overflow or underflow
            weights = ((top - top[:, :1]) / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, labels[idx], weights)  # (b, C)
        out.append(votes.argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 20,
                 temperature: Optional[float] = 0.07, metric: str = "cosine",
                 batch_size: int = 1024, device: Optional[Union[str, torch.device]] = None
                 ) -> float:
    """Top-1 (%) of :func:`knn_predict` on ``test_x``."""
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    pred = knn_predict(train_x, train_y, test_x, k, temperature, metric, num_classes,
                       batch_size, device)
    return 100.0 * (pred == test_y.cpu().long()).double().mean().item()


