"""Classification metrics over a data loader: top-1, top-5 and cross-entropy, exact over ranks."""
from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, progress: bool = False,
             desc: str = "eval") -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``model`` over ``loader``'s
    ``(images, targets)`` batches. Under a process group each rank reads its own share and the
    counts are summed, so the result is exact over ranks. ``progress``: a progress bar of the
    batches on stdout (pass it on rank 0 only), gone when done, as training's."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1, top5, loss sum
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc=desc, leave=False, disable=not progress,
               dynamic_ncols=True, file=sys.stdout)
    for images, targets in bar:
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hit = top5 == targets[:, None]
        totals += torch.stack([torch.full((), len(targets), device=device), hit[:, 0].sum(),
                               hit.any(1).sum(),
                               F.cross_entropy(logits, targets, reduction="sum")]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    n = max(totals[0].item(), 1)
    return dict(top1=100 * totals[1].item() / n, top5=100 * totals[2].item() / n,
                loss=totals[3].item() / n)
