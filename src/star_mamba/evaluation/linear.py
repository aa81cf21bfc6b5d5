"""Multinomial logistic regression trained to convergence: the linear probe's solver.

Features are standardised with the training statistics (:class:`Standardizer`); full-batch
L-BFGS (strong Wolfe line search) runs in the eigenbasis of the features (:class:`Eigenbasis`)
for each L2 weight decay of a sweep, each scored on a seeded stratified held-out part of the
training set (:func:`heldout_split`); the best one is refitted on the whole training set
(:func:`fit_logistic_regression`). Pure tensors in, a fitted :class:`LogisticRegression` out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from .config import PRECISIONS, WEIGHT_DECAYS

log = logging.getLogger("star_mamba")


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
                            heldout_fraction: float = 0.1, seed: int = 0, max_iter: int = 1000,
                            tolerance: float = 1e-4, tolerance_change: float = 1e-12,
                            history_size: int = 20, num_classes: Optional[int] = None,
                            precision: str = "float64", precondition: bool = True,
                            device: Optional[Union[str, torch.device]] = None
                            ) -> LogisticRegression:
    """Multinomial logistic regression with an L2 sweep, trained to convergence with L-BFGS.

    Features are standardised with the mean and std of ``train_x`` (kept in the result and
    applied to anything it predicts). Objective: mean cross-entropy + wd / 2 * ||W||^2, bias not
    decayed, full batch, ``torch.optim.LBFGS`` (lr 1, strong Wolfe line search, history
    ``history_size``) until the max-abs gradient is below ``tolerance`` (1e-4, sklearn's
    ``tol`` for its lbfgs solver on the same mean loss; on Fashion-MNIST pixels, going on to a
    gradient 10x smaller moved test top-1 by 0.02 points) or ``max_iter`` iterations, in
    ``precision`` (``float64`` by default, or ``float32``) on ``device`` (default CPU).
    ``precondition``: L-BFGS runs in
    the eigenbasis of the features (:class:`Eigenbasis`): the same objective and minimiser,
    reached in far fewer iterations on correlated features.

    Sweep: without ``val_x``, a seeded stratified ``heldout_fraction`` of the training set is held
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
    if precision not in PRECISIONS:
        raise ValueError(f"invalid precision={precision!r}; allowed: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    device = torch.device(device) if device is not None else torch.device("cpu")
    train_y = train_y.long()
    ys = [train_y] + ([val_y.long()] if val_y is not None else [])
    if num_classes is None:
        num_classes = int(max(y.max().item() for y in ys if len(y))) + 1
    standardizer = Standardizer.fit(train_x)
    x_all = standardizer(train_x.to(device), dtype)
    y_all = train_y.to(device)
    if val_x is None:
        fit_idx, val_idx = heldout_split(train_y, heldout_fraction, seed)
        if len(val_idx) == 0 or len(fit_idx) == 0:
            raise DataError(f"cannot hold out {heldout_fraction:.0%} of {len(train_y)} training "
                            "examples for the weight-decay sweep (probe.heldout_fraction); use "
                            "more training images")
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        x_fit, y_fit, x_val, y_val = x_all[fit_idx], y_all[fit_idx], x_all[val_idx], y_all[val_idx]
    else:
        x_fit, y_fit = x_all, y_all
        x_val, y_val = standardizer(val_x.to(device), dtype), val_y.long().to(device)
    opts = dict(max_iter=max_iter, tolerance_grad=tolerance,
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
                    f"{tolerance:g}")
    sweep.sort(key=lambda r: r["weight_decay"])
    return LogisticRegression(w.cpu(), b.cpu(), standardizer, best, num_classes, conv, sweep,
                              n_fit=len(x_all) if val_x is None else len(x_fit))


