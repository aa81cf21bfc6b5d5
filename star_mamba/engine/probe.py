"""Frozen-representation evaluation: features extracted once, a converged linear probe, k-NN.

The protocol behind ``star-mamba linprobe`` (``engine/linprobe.py``) and ``ablate``:

1. :func:`extract_features`: the frozen backbone (eval mode, no grad) over a dataset, once;
   pooled tokens of the last block (or the concatenation of several block taps).
2. :func:`fit_logistic_regression`: features standardised with the training statistics,
   multinomial logistic regression trained to convergence with full-batch L-BFGS (strong Wolfe
   line search) for each L2 weight decay of a sweep, scored on a seeded held-out part of the
   training set, then refitted on the whole training set with the best one.
3. :func:`knn_accuracy`: DINO's weighted k-NN vote over cosine similarities.
4. :func:`evaluate_representation`: 1-3 for a pretraining checkpoint (or any classifier) on a
   train and a test split, the features optionally cached on disk (:func:`cached_features`);
   :func:`raw_pixel_baseline`: the same probes on flattened pixels.

Imports only from ``models``, ``config`` and ``checkpoint`` (no other engine module, no tools or
CLI code).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..checkpoint import atomic_save
from ..errors import CheckpointError
from ..config import StarConfig
from ..models.classifier import StarClassifier
from ..models.convert import load_pretrained, read_pretrained

log = logging.getLogger("star_mamba")

WEIGHT_DECAYS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The default L2 sweep (on standardised features; the loss is the *mean* cross-entropy)."""

POOLS = ("avg", "cls")
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
"""The logistic regression's arithmetic (features, weights, L-BFGS state)."""


# ------------------------------------------------------------------------------ features

def _pool(tokens: Tensor, model: StarClassifier, pool: str) -> Tensor:
    """(B, L, D) tokens of the classifier's sequence -> (B, D): patch-token mean or class token."""
    i = model.cls_index
    if pool == "cls":
        return tokens[:, i]
    if i is None:
        return tokens.mean(dim=1)
    return torch.cat([tokens[:, :i], tokens[:, i + 1:]], dim=1).mean(dim=1)  # patch tokens only


def _check_layers(layers: Sequence[int], depth: int) -> list[int]:
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
        raise ValueError("pool='cls' needs a model with a class token "
                         "(class_token 'middle' or 'end')")
    depth = len(model.backbone.blocks)
    layers = None if layers is None else _check_layers(layers, depth)
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


# ------------------------------------------------------------------------------ standardisation

@dataclass
class Standardizer:
    """x -> (x - mean) / std with the statistics of the data it was fitted on (float64).

    A feature whose training std is below ``eps`` (a constant pixel) gets std 1: it is centred
    and stays 0 on the training set.
    """

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, x: Tensor, eps: float = 1e-6) -> "Standardizer":
        x = x.double()
        std = x.std(dim=0, unbiased=False)
        return cls(x.mean(dim=0), torch.where(std < eps, torch.ones_like(std), std))

    def __call__(self, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x.double() - mean) / std).to(dtype)


# ------------------------------------------------------------------------------ logistic regression

@dataclass
class Convergence:
    """How an L-BFGS fit ended. ``grad_norm``/``grad_max``: L2 / max-abs norm of the gradient of
    the regularised objective at the returned weights (recomputed after the optimiser stopped);
    ``converged``: ``grad_max <= tolerance_grad``; ``stop``: ``gradient``, ``max_iter`` (or its
    1.25 x max_iter evaluations) or ``no_progress`` (loss or step change below
    ``tolerance_change`` first: typically converged to float precision, check ``grad_max``)."""

    iterations: int
    function_evals: int
    loss: float
    grad_norm: float
    grad_max: float
    converged: bool
    stop: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Eigenbasis:
    """Features in the eigenbasis of their second moment, where L-BFGS is preconditioned.

    ``x^T x / n = U diag(lam) U^T``, ``rotated = x U``. For a weight decay wd, L-BFGS runs on
    ``V = W U diag(d)^(1/2)`` with ``d = lam + 4 wd``: the features become ``z = x U d^(-1/2)``,
    the penalty ``wd / 2 * sum_j ||V_j||^2 / d_j``, so the objective and its minimiser are the
    same, but its Hessian (cross-entropy curvature at most 1/4 per unit of variance, plus the
    decay) is close to a multiple of the identity: correlated features (a random backbone's
    eigenvalues span 15 decades) converge in tens of iterations instead of thousands.
    :meth:`identity` leaves the features as they are (plain L-BFGS).
    """

    rotated: Tensor  # (n, F) x U, the fit's dtype
    lam: Optional[Tensor]  # (F,) float64 eigenvalues; None: no rotation
    basis: Optional[Tensor]  # (F, F) float64 U; None: the identity

    @classmethod
    def of(cls, x: Tensor, chunk: int = 8192) -> "Eigenbasis":
        second = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        for block in x.split(chunk):  # (b, F): the float64 product without a float64 copy of x
            second += block.double().T @ block.double()
        lam, basis = torch.linalg.eigh(second / max(len(x), 1))
        return cls(x @ basis.to(x.dtype), lam.clamp_min(0), basis)

    @classmethod
    def identity(cls, x: Tensor) -> "Eigenbasis":
        return cls(x, None, None)

    def scales(self, wd: float) -> Optional[Tensor]:
        """sqrt(lam + 4 wd) (F,) float64, floored where wd = 0 meets a constant direction."""
        if self.lam is None:
            return None
        floor = 1e-12 * max(self.lam.max().item(), 1.0)
        return (self.lam + 4 * wd).clamp_min(floor).sqrt()

    def to_v(self, weight: Tensor, scale: Optional[Tensor]) -> Tensor:
        """W (C, F) -> V."""
        return weight if scale is None else (weight.double() @ self.basis) * scale

    def to_w(self, v: Tensor, scale: Optional[Tensor]) -> Tensor:
        """V (C, F) -> W."""
        return v if scale is None else (v.double() / scale) @ self.basis.T

    def grad_to_w(self, grad_v: Tensor, scale: Optional[Tensor]) -> Tensor:
        """The gradient in V (C, F) -> the gradient in W: d/dW = d/dV d^(1/2) U^T."""
        return grad_v if scale is None else (grad_v.double() * scale) @ self.basis.T


def _lbfgs(data: Eigenbasis, y: Tensor, num_classes: int, wd: float,
           init: Optional[tuple[Tensor, Tensor]], max_iter: int, tolerance_grad: float,
           tolerance_change: float, history_size: int) -> tuple[Tensor, Tensor, Convergence]:
    """Full-batch multinomial logistic regression with L-BFGS, preconditioned by ``data``'s
    basis: (W (C, F) and b (C,) in float64, report).

    Converged means: the largest entry of the gradient with respect to (W, b) is at most
    ``tolerance_grad``. L-BFGS stops on the gradient in V, so when that one met the tolerance
    but the gradient in W did not, it resumes with a 10x tighter tolerance; it ends when the
    gradient in W meets it, when ``max_iter`` iterations (1.25 x as many evaluations) in all
    are spent, or when L-BFGS stopped without meeting its tolerance (the loss or the step
    changed less than ``tolerance_change``: no progress left at this precision).
    """
    dtype, device = data.rotated.dtype, data.rotated.device
    num_features = data.rotated.shape[1]
    scale = data.scales(wd)
    x = data.rotated if scale is None else data.rotated / scale.to(dtype)  # (n, F) z
    penalty = None if scale is None else scale.pow(-2).to(dtype)  # (F,) 1 / d
    if init is None:
        v = torch.zeros(num_classes, num_features, dtype=dtype, device=device)
        bias = torch.zeros(num_classes, dtype=dtype, device=device)
    else:
        v = data.to_v(init[0].to(device), scale).to(dtype).clone()
        bias = init[1].detach().to(device, dtype).clone()
    v.requires_grad_(True)
    bias.requires_grad_(True)
    max_eval = int(max_iter * 1.25) + 1
    opt = torch.optim.LBFGS([v, bias], lr=1.0, max_iter=max_iter, max_eval=max_eval,
                            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                            history_size=history_size, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        decay = v.pow(2).sum() if penalty is None else (v.pow(2) * penalty).sum()
        return F.cross_entropy(x @ v.T + bias, y) + 0.5 * wd * decay

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=False)
        loss = objective()
        loss.backward()
        return loss

    state, group = opt.state[v], opt.param_groups[0]
    with torch.enable_grad():
        while True:
            done = int(state.get("n_iter", 0))
            opt.step(closure)
            loss = objective()
            grad_v, grad_b = torch.autograd.grad(loss, [v, bias])
            grad_w = data.grad_to_w(grad_v, scale)
            flat = torch.cat([grad_w.reshape(-1).double(), grad_b.double()])
            grad_max = flat.abs().max().item()
            iterations, evals = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
            stalled = max(grad_v.abs().max().item(), grad_b.abs().max().item()) > \
                group["tolerance_grad"]
            if (grad_max <= tolerance_grad or iterations >= max_iter or evals >= max_eval
                    or iterations == done or stalled):
                break
            group.update(tolerance_grad=group["tolerance_grad"] / 10,
                         max_iter=max_iter - iterations, max_eval=max_eval - evals)
    stop = ("gradient" if grad_max <= tolerance_grad else
            "max_iter" if iterations >= max_iter or evals >= max_eval else "no_progress")
    report = Convergence(iterations, evals, loss.item(), flat.norm().item(), grad_max,
                         grad_max <= tolerance_grad, stop)
    weight = data.to_w(v.detach(), scale).double()
    bias = bias.detach().double()
    return weight, bias - bias.mean(), report  # the softmax ignores a common shift of the bias


@dataclass
class LogisticRegression:
    """A fitted multinomial logistic regression on standardised features.

    ``weight`` (C, F) and ``bias`` (C,) act on ``standardizer(x)``; the training statistics are
    kept in ``standardizer``, so :meth:`predict` and :meth:`accuracy` take raw features.
    ``sweep``: one row per weight decay (held-out top-1 and cross-entropy, convergence);
    ``convergence``: the final fit's.
    """

    weight: Tensor
    bias: Tensor
    standardizer: Standardizer
    weight_decay: float
    num_classes: int
    convergence: Convergence
    sweep: list[dict[str, Any]] = field(default_factory=list)
    n_fit: int = 0

    def logits(self, x: Tensor) -> Tensor:
        z = self.standardizer(x.to(self.weight.device), self.weight.dtype)
        return z @ self.weight.T + self.bias

    def predict_proba(self, x: Tensor) -> Tensor:
        return self.logits(x).softmax(dim=1)

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(dim=1).cpu()

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Top-1 in percent."""
        return 100.0 * (self.predict(x) == y.cpu()).double().mean().item()

    @property
    def sweep_scores(self) -> dict[float, float]:
        """Held-out top-1 (%) per weight decay."""
        return {row["weight_decay"]: row["val_top1"] for row in self.sweep}


def heldout_split(labels: Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded stratified split: (fit indices, held-out indices), each sorted.

    Each class with at least 2 examples gives ``max(1, round(fraction * n_c))`` of them, drawn
    with a ``torch.Generator`` seeded with ``seed``, to the held-out part.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"invalid fraction={fraction}: must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    held = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            continue
        n = max(1, round(fraction * len(idx)))
        held.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    held = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().flatten(), held


def fit_logistic_regression(train_x: Tensor, train_y: Tensor, val_x: Optional[Tensor] = None,
                            val_y: Optional[Tensor] = None, *,
                            weight_decays: Sequence[float] = WEIGHT_DECAYS,
                            val_fraction: float = 0.1, seed: int = 0, max_iter: int = 1000,
                            tolerance_grad: float = 1e-4, tolerance_change: float = 1e-12,
                            history_size: int = 20, num_classes: Optional[int] = None,
                            dtype: torch.dtype = torch.float64, precondition: bool = True,
                            device: Optional[Union[str, torch.device]] = None
                            ) -> LogisticRegression:
    """Multinomial logistic regression with an L2 sweep, trained to convergence with L-BFGS.

    Features are standardised with the mean and std of ``train_x`` (kept in the result and
    applied to anything it predicts). Objective: mean cross-entropy + wd / 2 * ||W||^2, bias not
    decayed, full batch, ``torch.optim.LBFGS`` (lr 1, strong Wolfe line search, history
    ``history_size``) until the max-abs gradient is below ``tolerance_grad`` (1e-4, sklearn's
    ``tol`` for its lbfgs solver on the same mean loss; on Fashion-MNIST pixels, going on to a
    gradient 10x smaller moved test top-1 by 0.02 points) or ``max_iter`` iterations, in
    ``dtype`` (float64 by default) on ``device`` (default CPU). ``precondition``: L-BFGS runs in
    the eigenbasis of the features (:class:`Eigenbasis`): the same objective and minimiser,
    reached in far fewer iterations on correlated features.

    Sweep: without ``val_x``, a seeded stratified ``val_fraction`` of the training set is held
    out (:func:`heldout_split`); each weight decay, from the largest down (each fit warm-started
    from the previous one), is fitted on the rest and scored on the held-out part by top-1,
    ties broken by the lower held-out cross-entropy, then by the larger weight decay; the best
    one is then refitted on the whole training set (warm-started). Warm starts make the sweep
    cheap, but a weight decay next to the previous one may already meet the tolerance at the
    previous solution (0 iterations, the same scores: a tie, so the larger one wins). With
    ``val_x``/``val_y``, the sweep fits on ``train_x``, scores on them, and the best sweep fit
    is the result. Deterministic for a seed (zero init, fixed order).
    """
    if not weight_decays or any(not wd >= 0 for wd in weight_decays):
        raise ValueError(f"invalid weight_decays={tuple(weight_decays)}: non-negative values "
                         "expected")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    device = torch.device(device) if device is not None else torch.device("cpu")
    train_y = train_y.long()
    ys = [train_y] + ([val_y.long()] if val_y is not None else [])
    if num_classes is None:
        num_classes = int(max(y.max().item() for y in ys if len(y))) + 1
    standardizer = Standardizer.fit(train_x)
    x_all = standardizer(train_x.to(device), dtype)
    y_all = train_y.to(device)
    if val_x is None:
        fit_idx, val_idx = heldout_split(train_y, val_fraction, seed)
        if len(val_idx) == 0 or len(fit_idx) == 0:
            raise ValueError(f"cannot hold out {val_fraction:.0%} of {len(train_y)} training "
                             "examples for the weight-decay sweep; pass val_x/val_y")
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        x_fit, y_fit, x_val, y_val = x_all[fit_idx], y_all[fit_idx], x_all[val_idx], y_all[val_idx]
    else:
        x_fit, y_fit = x_all, y_all
        x_val, y_val = standardizer(val_x.to(device), dtype), val_y.long().to(device)
    opts = dict(max_iter=max_iter, tolerance_grad=tolerance_grad,
                tolerance_change=tolerance_change, history_size=history_size)
    basis = Eigenbasis.of if precondition else Eigenbasis.identity

    sweep, fits, init, fit_data = [], {}, None, basis(x_fit)
    for wd in sorted({float(w) for w in weight_decays}, reverse=True):
        w, b, conv = _lbfgs(fit_data, y_fit, num_classes, wd, init, **opts)
        init = (w, b)
        with torch.no_grad():
            logits = x_val.double() @ w.T + b
            top1 = 100.0 * (logits.argmax(1) == y_val).double().mean().item()
            val_loss = F.cross_entropy(logits, y_val).item()
        fits[wd] = (w, b, conv)
        sweep.append(dict(weight_decay=wd, val_top1=top1, val_loss=val_loss,
                          iterations=conv.iterations, grad_norm=conv.grad_norm,
                          converged=conv.converged))
        log.debug(f"logistic regression wd {wd:g}: held-out top-1 {top1:.2f}, loss {val_loss:.4f}, "
                  f"{conv.iterations} iterations, |grad| {conv.grad_norm:.2e}")
    best = max(sweep, key=lambda r: (r["val_top1"], -r["val_loss"]))["weight_decay"]
    w, b, conv = fits[best]
    if val_x is None:  # refit on the whole training set, from the sweep's solution
        del fit_data
        w, b, conv = _lbfgs(basis(x_all), y_all, num_classes, best, (w, b), **opts)
    if not conv.converged:
        log.warning(f"logistic regression (wd {best:g}) stopped by {conv.stop} after "
                    f"{conv.iterations} iterations with max |grad| {conv.grad_max:.2e} > "
                    f"{tolerance_grad:g}")
    sweep.sort(key=lambda r: r["weight_decay"])
    return LogisticRegression(w.cpu(), b.cpu(), standardizer, best, num_classes, conv, sweep,
                              n_fit=len(x_all) if val_x is None else len(x_fit))


# ------------------------------------------------------------------------------ k-NN

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


# ------------------------------------------------------------------------------ top level

def probe_features(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *,
                   weight_decays: Sequence[float] = WEIGHT_DECAYS, val_fraction: float = 0.1,
                   max_iter: int = 1000, tolerance_grad: float = 1e-4,
                   dtype: torch.dtype = torch.float64, seed: int = 0, knn_k: int = 20,
                   knn_temperature: Optional[float] = 0.07, knn_standardize: bool = False,
                   device: Optional[Union[str, torch.device]] = None) -> dict[str, Any]:
    """Logistic regression (with its sweep, :func:`fit_logistic_regression`) and k-NN on given
    features; a JSON-able summary.

    ``knn_standardize``: run k-NN on the features standardised with the training statistics
    (the raw-pixel baseline does; backbone features go in as they are, as in DINO).
    """
    t0 = time.perf_counter()
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    lr = fit_logistic_regression(train_x, train_y, weight_decays=weight_decays,
                                 val_fraction=val_fraction, max_iter=max_iter,
                                 tolerance_grad=tolerance_grad, seed=seed,
                                 num_classes=num_classes, dtype=dtype, device=device)
    t1 = time.perf_counter()
    if knn_standardize:
        kx, kq = lr.standardizer(train_x, torch.float32), lr.standardizer(test_x, torch.float32)
    else:
        kx, kq = train_x, test_x
    knn = knn_accuracy(kx, train_y, kq, test_y, k=knn_k, temperature=knn_temperature,
                       device=device)
    t2 = time.perf_counter()
    c = lr.convergence
    return dict(linear_probe_top1=lr.accuracy(test_x, test_y), knn_top1=knn,
                weight_decay=lr.weight_decay,
                heldout_top1={str(r["weight_decay"]): r["val_top1"] for r in lr.sweep},
                n_train=len(train_y), n_test=len(test_y), feature_dim=int(train_x.shape[1]),
                linear_probe_train_top1=lr.accuracy(train_x, train_y),
                lr_iterations=c.iterations, lr_grad_norm=c.grad_norm, lr_grad_max=c.grad_max,
                lr_loss=c.loss, lr_converged=c.converged, sweep=lr.sweep, knn_k=knn_k,
                knn_temperature=knn_temperature, seconds_linear=t1 - t0, seconds_knn=t2 - t1)


def classifier_from_pretrained(source: Union[str, Path, Mapping[str, Any]],
                               **overrides: Any) -> StarClassifier:
    """A classifier holding a pretraining checkpoint's backbone, as pretrained.

    The checkpoint's ``model_config`` (a path, an engine checkpoint dict, or ``{"model": state,
    "model_config": cfg}``) with the classifier fields set for probing: ``directions=1`` (the
    causal backbone as it was pretrained), ``class_token="none"``, ``global_pool="avg"``,
    ``drop_path_rate=0``; ``overrides`` change any field (e.g. ``directions=4`` widens the mixers,
    see :func:`~star_mamba.models.convert.load_pretrained`). A checkpoint without a config needs
    every differing field in ``overrides``. Raises if a backbone weight is not in the checkpoint.
    """
    state, pre_cfg = read_pretrained(source)
    values = dict(pre_cfg or {})
    values.update(directions=1, class_token="none", global_pool="avg", drop_path_rate=0.0)
    values.update(overrides)
    model = StarClassifier(StarConfig.from_dict(values))
    report = load_pretrained(model, {"model": state, "model_config": pre_cfg})
    missing = [k for k in report.new if k.startswith("backbone.")]
    if missing:
        raise CheckpointError(
            f"the checkpoint does not hold the backbone's {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing): not a STAR "
            "pretraining checkpoint of this model?")
    log.info(f"probe backbone: {report.summary()}")
    return model


def is_classifier_state(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is a classifier's (``backbone.*`` keys), not a pretraining model's."""
    return any(k.startswith("backbone.") for k in state)


def classifier_from_checkpoint(source: Union[str, Path, Mapping[str, Any]],
                               **overrides: Any) -> StarClassifier:
    """The frozen model a probe reads from any star-mamba checkpoint (path or dict).

    A classifier checkpoint (``star-mamba finetune``, ``convert-arm``: ``backbone.*`` keys) is
    rebuilt as it was trained, from its own ``model_config`` with ``overrides`` (e.g. runtime
    fields such as ``scan_backend``), and must fit it exactly; a pretraining checkpoint goes
    through :func:`classifier_from_pretrained`.
    """
    state, cfg = read_pretrained(source)
    if not is_classifier_state(state):
        return classifier_from_pretrained({"model": state, "model_config": cfg}, **overrides)
    if cfg is None:
        raise CheckpointError("the classifier checkpoint holds no model_config to rebuild it from")
    model = StarClassifier(StarConfig.from_dict({**cfg, **overrides}))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise CheckpointError(f"the classifier weights do not fit their model config: "
                              f"{' '.join(str(e).split())}") from e
    return model


def cached_features(path: Optional[Path], key: Mapping[str, Any],
                    compute: Callable[[], tuple[Tensor, Tensor]]
                    ) -> tuple[Tensor, Tensor, bool]:
    """``compute()``'s (features, labels), kept in the file ``path`` under ``key``.

    A file made with an equal ``key`` (JSON-able: what the features depend on) is read back
    instead of computing: returns (features, labels, True). A file made with another key
    (another checkpoint, setting or dataset), or unreadable, is recomputed and replaced,
    atomically. ``path=None``: no cache.
    """
    if path is None:
        return (*compute(), False)
    text = json.dumps(key, sort_keys=True, default=str)
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: made again
            log.warning(f"cannot read the feature cache {path} ({type(e).__name__}); "
                        "extracting again")
            saved = {}
        if saved.get("key") == text:
            log.info(f"features read back from {path}")
            return saved["features"], saved["labels"], True
        if "key" in saved:
            old = json.loads(saved["key"])
            changed = sorted(k for k in {*old, *key} if old.get(k) != json.loads(text).get(k))
            log.info(f"{path} was made for another {', '.join(changed)}: extracting again")
    x, y = compute()
    atomic_save({"key": text, "features": x, "labels": y}, path)
    return x, y, False


def evaluate_representation(model: Union[StarClassifier, str, Path, Mapping[str, Any]],
                            train_set: Dataset, test_set: Dataset, *, batch_size: int = 256,
                            device: Optional[Union[str, torch.device]] = None,
                            layers: Optional[Sequence[int]] = None, pool: str = "avg",
                            amp_dtype: Optional[torch.dtype] = None, num_workers: int = 0,
                            weight_decays: Sequence[float] = WEIGHT_DECAYS,
                            val_fraction: float = 0.1, max_iter: int = 1000,
                            tolerance_grad: float = 1e-4, dtype: torch.dtype = torch.float64,
                            seed: int = 0, knn_k: int = 20,
                            knn_temperature: Optional[float] = 0.07,
                            knn_standardize: bool = False, progress: bool = True,
                            model_overrides: Optional[Mapping[str, Any]] = None,
                            cache_dir: Optional[Union[str, Path]] = None,
                            cache_key: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Linear probe (converged logistic regression) and k-NN of a frozen backbone.

    ``model``: a built :class:`StarClassifier`, or a checkpoint (path or dict) given to
    :func:`classifier_from_checkpoint` with ``model_overrides``. Features of ``train_set`` and
    ``test_set`` (evaluation transforms: no augmentation) are extracted once on ``device``
    (default: CUDA when available), then probed on the same device. ``cache_dir``: keep them in
    ``features-train.pt`` / ``features-test.pt`` there (:func:`cached_features`), under
    ``cache_key`` (required with it: what identifies the weights and the images) plus the
    extraction settings and the split's size. Returns ``dict(linear_probe_top1, knn_top1,
    weight_decay, heldout_top1, n_train, n_test, feature_dim, seconds, ...)`` (top-1 in percent;
    the rest: sweep, convergence, timings, which splits came from the cache), JSON-serialisable.
    """
    if cache_dir is not None and cache_key is None:
        raise ValueError("cache_dir needs a cache_key naming the weights and the data")
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(model, StarClassifier):
        model = classifier_from_checkpoint(model, **dict(model_overrides or {}))
    elif model_overrides:
        raise ValueError("model_overrides only apply when model is a checkpoint")
    layers = None if layers is None else _check_layers(layers, len(model.backbone.blocks))
    kw = dict(batch_size=batch_size, device=device, layers=layers, pool=pool,
              amp_dtype=amp_dtype, num_workers=num_workers, progress=progress)
    settings = dict(layers=layers, pool=pool, amp=str(amp_dtype), norm=True)
    original = next(model.parameters()).device
    cached = {}
    features = {}
    try:
        for split, dataset in (("train", train_set), ("test", test_set)):
            def compute(dataset=dataset, split=split) -> tuple[Tensor, Tensor]:
                model.to(device)
                return extract_features(model, dataset, desc=f"features ({split})", **kw)
            path = None if cache_dir is None else Path(cache_dir) / f"features-{split}.pt"
            key = {**dict(cache_key or {}), **settings, "split": split, "images": len(dataset)}
            *features[split], cached[split] = cached_features(path, key, compute)
    finally:
        model.to(original)
    t1 = time.perf_counter()
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    out = probe_features(train_x, train_y, test_x, test_y, weight_decays=weight_decays,
                         val_fraction=val_fraction, max_iter=max_iter,
                         tolerance_grad=tolerance_grad, dtype=dtype, seed=seed, knn_k=knn_k,
                         knn_temperature=knn_temperature, knn_standardize=knn_standardize,
                         device=device)
    out.update(layers=layers, pool=pool, features_cached=cached, seconds_features=t1 - t0,
               seconds=time.perf_counter() - t0)
    log.info(f"linear probe top-1 {out['linear_probe_top1']:.2f} (wd {out['weight_decay']:g}, "
             f"{out['lr_iterations']} L-BFGS iterations), {knn_k}-NN top-1 {out['knn_top1']:.2f}, "
             f"{out['n_train']} train / {out['n_test']} test, {out['feature_dim']} features, "
             f"{out['seconds']:.0f} s")
    return out


def raw_pixel_baseline(train_set: Dataset, test_set: Dataset, *, batch_size: int = 512,
                       num_workers: int = 0, weight_decays: Sequence[float] = WEIGHT_DECAYS,
                       val_fraction: float = 0.1, max_iter: int = 1000,
                       tolerance_grad: float = 1e-4, dtype: torch.dtype = torch.float64,
                       seed: int = 0, knn_k: int = 20, knn_temperature: Optional[float] = 0.07,
                       knn_standardize: bool = True,
                       device: Optional[Union[str, torch.device]] = None,
                       progress: bool = False) -> dict[str, Any]:
    """The probes of :func:`evaluate_representation` on flattened raw pixels (standardised with
    the training statistics, for the logistic regression and, by default, for k-NN)."""
    t0 = time.perf_counter()
    train_x, train_y = dataset_pixels(train_set, batch_size, num_workers, progress)
    test_x, test_y = dataset_pixels(test_set, batch_size, num_workers, progress)
    out = probe_features(train_x, train_y, test_x, test_y, weight_decays=weight_decays,
                         val_fraction=val_fraction, max_iter=max_iter,
                         tolerance_grad=tolerance_grad, dtype=dtype, seed=seed, knn_k=knn_k,
                         knn_temperature=knn_temperature, knn_standardize=knn_standardize,
                         device=device)
    out.update(seconds=time.perf_counter() - t0)
    return out


def subset(dataset: Dataset, max_items: Optional[int]) -> Dataset:
    """The first ``max_items`` items (all when None): the probes' budgets."""
    if max_items is None or max_items >= len(dataset):
        return dataset
    return Subset(dataset, range(max_items))
