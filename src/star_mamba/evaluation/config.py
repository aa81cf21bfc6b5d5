"""``probe``: the run config section of the converged linear probe and k-NN (``star-mamba
linprobe``, and ``ablate``'s default probe), checked when it is built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..errors import ConfigError

WEIGHT_DECAYS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The default L2 sweep (on standardised features; the loss is the *mean* cross-entropy)."""

POOLS = ("avg", "cls")
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
"""The logistic regression's arithmetic (features, weights, L-BFGS state)."""


@dataclass
class ProbeConfig:
    """``probe``: the protocol is in ``evaluation/`` (features, linear, knn, probe). The device,
    autocast, threads and seed (of the held-out split and of a random backbone) are ``run``'s;
    the images are ``data``'s (no augmentation: the evaluation transform for both splits)."""

    pool: Literal["avg", "cls"] = "avg"  # avg (mean of the patch tokens) | cls (the class token)
    layers: Optional[tuple[int, ...]] = None  # 1-based blocks, pooled and concatenated; null = last
    batch_size: int = 256  # images per forward pass while extracting features
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS  # the L2 sweep (on standardised features)
    heldout_fraction: float = 0.1  # stratified share of the training set that picks the decay
    max_iter: int = 1000  # L-BFGS iterations per fit
    tolerance: float = 1e-4  # a fit is converged when max |gradient| is below this
    precision: Literal["float64", "float32"] = "float64"  # the logistic regression's arithmetic
    knn_k: int = 20  # neighbours of the k-NN vote (cosine similarity)
    knn_temperature: Optional[float] = 0.07  # vote weight exp(sim / T); null = plain majority
    cache_features: bool = True  # keep the features in run.output_dir for a re-run

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ConfigError:
            value = getattr(self, name)
            shown = list(value) if isinstance(value, tuple) else value  # as it was written
            return ConfigError(f"invalid config: probe.{name}={shown!r}; {what}")
        if self.pool not in POOLS:
            raise bad("pool", f"allowed: {', '.join(POOLS)}")
        if self.layers is not None and (not self.layers or min(self.layers) < 1):
            raise bad("layers", "expected 1-based block indices, e.g. [6, 12], or null for the "
                                "last block")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise bad("weight_decays", "expected a non-empty list of values >= 0")
        if not 0 < self.heldout_fraction < 1:
            raise bad("heldout_fraction", "expected a fraction in (0, 1)")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"allowed: {', '.join(PRECISIONS)}")
        for name in ("batch_size", "max_iter", "knn_k"):
            if getattr(self, name) < 1:
                raise bad(name, "expected a positive integer")
        if not self.tolerance > 0:
            raise bad("tolerance", "expected a number > 0")
        if self.knn_temperature is not None and not self.knn_temperature > 0:
            raise bad("knn_temperature", "expected a number > 0, or null for a plain majority")

    def fit_options(self) -> dict:
        """The keyword arguments of :func:`.linear.fit_logistic_regression` this section sets
        (the same names)."""
        return dict(weight_decays=self.weight_decays, heldout_fraction=self.heldout_fraction,
                    max_iter=self.max_iter, tolerance=self.tolerance, precision=self.precision)
