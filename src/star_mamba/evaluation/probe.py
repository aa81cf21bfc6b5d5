"""The probes of a representation: a converged linear probe and k-NN on given features.

:func:`probe_features` takes (train, test) features and labels and the ``probe`` config section
and returns the numbers (JSON-able); :func:`raw_pixel_baseline` runs it on flattened pixels.
Where the features come from (a checkpoint, a cache) is the linprobe task's business
(``tasks/linprobe.py``).
"""
from __future__ import annotations

import time
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .config import ProbeConfig
from .features import dataset_pixels
from .knn import knn_accuracy
from .linear import fit_logistic_regression


def probe_features(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                   probe: ProbeConfig = ProbeConfig(), *, seed: int = 0,
                   knn_standardize: bool = False,
                   device: Optional[Union[str, torch.device]] = None) -> dict[str, Any]:
    """Logistic regression (with its sweep, :func:`.linear.fit_logistic_regression`) and k-NN
    on given features, with the settings of ``probe``; a JSON-able summary. Both are scored on
    the *test* features; ``linear_probe_train_top1`` is the fit's own training accuracy.

    ``knn_standardize``: run k-NN on the features standardised with the training statistics
    (the raw-pixel baseline does; backbone features go in as they are, as in DINO).
    """
    t0 = time.perf_counter()
    num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    lr = fit_logistic_regression(train_x, train_y, seed=seed, num_classes=num_classes,
                                 device=device, **probe.fit_options())
    t1 = time.perf_counter()
    if knn_standardize:
        kx, kq = lr.standardizer(train_x, torch.float32), lr.standardizer(test_x, torch.float32)
    else:
        kx, kq = train_x, test_x
    knn = knn_accuracy(kx, train_y, kq, test_y, k=probe.knn_k, temperature=probe.knn_temperature,
                       device=device)
    t2 = time.perf_counter()
    c = lr.convergence
    return dict(linear_probe_top1=lr.accuracy(test_x, test_y), knn_top1=knn,
                weight_decay=lr.weight_decay,
                heldout_top1={str(r["weight_decay"]): r["val_top1"] for r in lr.sweep},
                n_train=len(train_y), n_test=len(test_y), feature_dim=int(train_x.shape[1]),
                linear_probe_train_top1=lr.accuracy(train_x, train_y),
                lr_iterations=c.iterations, lr_grad_norm=c.grad_norm, lr_grad_max=c.grad_max,
                lr_loss=c.loss, lr_converged=c.converged, sweep=lr.sweep, knn_k=probe.knn_k,
                knn_temperature=probe.knn_temperature, seconds_linear=t1 - t0,
                seconds_knn=t2 - t1)


def raw_pixel_baseline(train_set: Dataset, test_set: Dataset, probe: ProbeConfig = ProbeConfig(),
                       *, seed: int = 0, batch_size: int = 512, num_workers: int = 0,
                       knn_standardize: bool = True,
                       device: Optional[Union[str, torch.device]] = None,
                       progress: bool = False) -> dict[str, Any]:
    """:func:`probe_features` on flattened raw pixels (standardised with the training
    statistics, for the logistic regression and, by default, for k-NN)."""
    t0 = time.perf_counter()
    train_x, train_y = dataset_pixels(train_set, batch_size, num_workers, progress)
    test_x, test_y = dataset_pixels(test_set, batch_size, num_workers, progress)
    out = probe_features(train_x, train_y, test_x, test_y, probe, seed=seed,
                         knn_standardize=knn_standardize, device=device)
    out.update(seconds=time.perf_counter() - t0)
    return out
