"""Frozen-representation probes: converged logistic regression, k-NN, features, raw pixels."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import star_mamba
from star_mamba.data import SyntheticImages
from star_mamba.evaluation.config import ProbeConfig
from star_mamba.evaluation.features import extract_features
from star_mamba.evaluation.knn import knn_predict
from star_mamba.evaluation.linear import Standardizer, fit_logistic_regression, heldout_split
from star_mamba.evaluation.probe import probe_features, raw_pixel_baseline
from star_mamba.models.io import probe_classifier as classifier_from_pretrained
from star_mamba.tasks.linprobe import evaluate_representation

from .conftest import TINY, TINY_DECODER, tiny_classifier



def blobs(n_per_class, centers, scale, seed=0, noise_labels=0.0):
    """Gaussian blobs around ``centers`` (C, F); a fraction of labels replaced at random."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.as_tensor(centers, dtype=torch.float64)
    c, f = centers.shape
    y = torch.arange(c).repeat_interleave(n_per_class)
    x = centers[y] + scale * torch.randn(len(y), f, generator=g, dtype=torch.float64)
    if noise_labels:
        flip = torch.rand(len(y), generator=g) < noise_labels
        y = torch.where(flip, torch.randint(c, (len(y),), generator=g), y)
    return x.float(), y


def objective_grad(model, x, y):
    """Gradient of mean CE + wd/2 ||W||^2 at the fitted weights, standardising independently."""
    x = x.double()
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    w = model.weight.clone().requires_grad_(True)
    b = model.bias.clone().requires_grad_(True)
    loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * model.weight_decay * w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    return torch.cat([gw.flatten(), gb]).norm().item(), loss.item(), z


# ------------------------------------------------------------------------ logistic regression

def test_logistic_regression_separable_reaches_100_and_converges():
    x, y = blobs(40, [[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0]], 0.5)
    lr = fit_logistic_regression(x, y, weight_decays=(1e-3,), tolerance=1e-6)
    assert lr.accuracy(x, y) == 100.0
    c = lr.convergence
    assert c.converged and c.stop == "gradient" and c.grad_max <= 1e-6, c
    assert 0 < c.iterations < 1000
    grad_norm, loss, _ = objective_grad(lr, x, y)
    assert grad_norm < 1e-5 and loss == pytest.approx(c.loss, rel=1e-9)


def test_logistic_regression_is_the_minimiser_of_the_regularised_loss():
    """Overlapping classes (no closed form): the gradient vanishes at the solution, no nearby
    point is lower, and the probabilities are the softmax of the standardised logits."""
    x, y = blobs(60, [[1, 0, 0.5], [0, 1, 0], [0.5, 0.5, 1]], 1.0, seed=1)
    lr = fit_logistic_regression(x, y, weight_decays=(1e-2,), tolerance=1e-8)
    grad_norm, loss, z = objective_grad(lr, x, y)
    assert grad_norm < 1e-5, grad_norm
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # convexity: any perturbation raises the loss
        dw = 1e-2 * torch.randn(lr.weight.shape, generator=g, dtype=torch.float64)
        moved = (F.cross_entropy(z @ (lr.weight + dw).T + lr.bias, y)
                 + 0.5 * lr.weight_decay * (lr.weight + dw).pow(2).sum()).item()
        assert moved > loss
    probs = torch.softmax(z @ lr.weight.T + lr.bias, dim=1)
    assert torch.allclose(lr.predict_proba(x), probs, atol=1e-12)
    assert torch.equal(lr.predict(x), probs.argmax(1))
    assert 50 < lr.accuracy(x, y) < 100  # overlapping, yet well above chance


def test_preconditioning_reaches_the_same_minimum_in_far_fewer_iterations():
    """Correlated features (mixed by a matrix with singular values from 10 to 1e-5): plain and
    preconditioned L-BFGS end at the same regularised loss, the preconditioned one in a tenth
    of the iterations, and its gradient, recomputed in the original coordinates, vanishes."""
    g = torch.Generator().manual_seed(11)
    x, y = blobs(200, torch.eye(3, 12) * 2.0, 1.0, seed=11)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    x = (x.double() @ q @ torch.diag(torch.logspace(1, -5, 12, dtype=torch.float64)) @ q.T).float()
    fast, plain = (fit_logistic_regression(x, y, weight_decays=(1e-5,), tolerance=1e-6,
                                           precondition=p) for p in (True, False))
    assert fast.convergence.converged and plain.convergence.converged
    assert fast.convergence.iterations * 5 < plain.convergence.iterations, (fast.convergence,
                                                                            plain.convergence)
    assert fast.convergence.loss == pytest.approx(plain.convergence.loss, abs=1e-8)
    grad_norm, loss, _ = objective_grad(fast, x, y)
    assert grad_norm < 1e-5 and loss == pytest.approx(fast.convergence.loss, rel=1e-9)


def test_float32_fit_agrees_with_float64():
    x, y = blobs(100, [[1, 0, 0.5, 0], [0, 1, 0, 0.5], [0.5, 0.5, 1, 0]], 1.0, seed=12)
    single, double = (fit_logistic_regression(x, y, weight_decays=(1e-4, 1e-2), precision=d)
                      for d in ("float32", "float64"))
    assert single.convergence.converged and single.weight_decay == double.weight_decay
    assert single.convergence.loss == pytest.approx(double.convergence.loss, rel=1e-5)
    assert torch.equal(single.predict(x), double.predict(x))


def test_logistic_regression_is_deterministic():
    x, y = blobs(30, [[1, 0], [0, 1], [1, 1]], 0.7, seed=2)
    a = fit_logistic_regression(x, y, seed=3)
    b = fit_logistic_regression(x, y, seed=3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.sweep == b.sweep and a.weight_decay == b.weight_decay


def test_sweep_picks_the_best_held_out_score_recomputed_independently():
    x, y = blobs(40, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], 1.0, seed=4)
    wds = (1e-4, 1e-2, 1.0)
    lr = fit_logistic_regression(x, y, weight_decays=wds, seed=5, tolerance=1e-9)
    assert [r["weight_decay"] for r in lr.sweep] == sorted(wds)
    best = max(lr.sweep, key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert lr.weight_decay == best["weight_decay"]
    fit_idx, val_idx = heldout_split(y, 0.1, seed=5)
    assert len(val_idx) == 12 and set(fit_idx.tolist()).isdisjoint(val_idx.tolist())
    for row in lr.sweep:  # each point refitted cold, on the same split and statistics
        s = Standardizer.fit(x)
        w = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")
        zf, zv = s(x[fit_idx]), s(x[val_idx])

        def closure():
            opt.zero_grad()
            loss = (F.cross_entropy(zf @ w.T + b, y[fit_idx])
                    + 0.5 * row["weight_decay"] * w.pow(2).sum())
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            logits = zv @ w.T + b
        assert 100 * (logits.argmax(1) == y[val_idx]).double().mean().item() == row["val_top1"]
        val_loss = F.cross_entropy(logits, y[val_idx]).item()
        assert val_loss == pytest.approx(row["val_loss"], abs=1e-6)
    # the final model is refitted on the whole training set at the chosen weight decay
    assert lr.n_fit == len(y) and objective_grad(lr, x, y)[0] < 1e-5


def test_sweep_regularises_more_with_few_noisy_examples_than_with_many_clean_ones():
    """Few noisy examples in many dimensions (90 in 100-D, 40% labels random) against many
    clean ones (600 in 20-D, separable). The held-out choice is noisy, so over 5 seeds."""
    wds = (1e-6, 1e-4, 1e-2, 1.0)
    more = 0
    for seed in range(5):
        noisy = fit_logistic_regression(*blobs(30, torch.eye(3, 100) * 1.5, 1.0, seed=seed,
                                               noise_labels=0.4), weight_decays=wds,
                                        heldout_fraction=0.3)
        clean = fit_logistic_regression(*blobs(200, torch.eye(3, 20) * 4.5, 0.5, seed=seed),
                                        weight_decays=wds)
        assert clean.weight_decay <= 1e-4, clean.sweep
        more += noisy.weight_decay > clean.weight_decay
    assert more >= 4


def test_standardisation_uses_training_statistics_only():
    """Train: x ~ U(-1, 1), label x > 0. Test: shifted to U(0.2, 1.2), all label 1. Standardised
    with the training statistics every test point is on the positive side; with its own
    statistics (a leak) about half would cross to the other side."""
    g = torch.Generator().manual_seed(7)
    train_x = torch.rand(400, 1, generator=g) * 2 - 1
    train_y = (train_x[:, 0] > 0).long()
    test_x = torch.rand(200, 1, generator=g) + 0.2
    test_y = torch.ones(200, dtype=torch.long)
    out = probe_features(train_x, train_y, test_x, test_y, ProbeConfig(knn_k=5),
                         knn_standardize=True)
    assert out["linear_probe_top1"] >= 99 and out["knn_top1"] >= 99, out
    lr = fit_logistic_regression(train_x, train_y)
    assert torch.allclose(lr.standardizer.mean, train_x.double().mean(0))
    assert torch.allclose(lr.standardizer.std, train_x.double().std(0, unbiased=False))
    leaked = Standardizer.fit(test_x)  # what a leak would compute
    z = leaked(test_x)
    leaked_pred = (z @ lr.weight.T + lr.bias).argmax(1)
    assert 100 * (leaked_pred == test_y).double().mean() < 80  # the check above would fail


# ------------------------------------------------------------------------ k-NN

def brute_force_knn(train_x, train_y, test_x, k, temperature, metric, num_classes):
    out = []
    for q in test_x.tolist():
        sims = []
        for p, label in zip(train_x.tolist(), train_y.tolist()):
            if metric == "cosine":
                s = sum(a * b for a, b in zip(q, p)) / (math.hypot(*q) * math.hypot(*p))
            else:
                s = -math.dist(q, p)
            sims.append((s, label))
        sims.sort(key=lambda t: -t[0])
        votes = [0.0] * num_classes
        for s, label in sims[:k]:
            votes[label] += 1.0 if temperature is None else math.exp((s - sims[0][0]) / temperature)
        out.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(out)


@pytest.mark.parametrize("metric,temperature,k", [("cosine", 0.07, 5), ("cosine", None, 3),
                                                   ("euclidean", 0.5, 4), ("euclidean", None, 1)])
def test_knn_equals_brute_force(metric, temperature, k):
    g = torch.Generator().manual_seed(8)
    train_x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    train_y = torch.randint(3, (40,), generator=g)
    test_x = torch.randn(25, 2, generator=g, dtype=torch.float64)
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, metric=metric,
                       num_classes=3, batch_size=7)
    expected = brute_force_knn(train_x, train_y, test_x, k, temperature, metric, 3)
    assert torch.equal(pred, expected)


# ------------------------------------------------------------------------ features

@pytest.fixture(scope="module")
def tiny_model():
    return tiny_classifier(class_token="end")  # 4 directions, class token after 16 patches


@pytest.fixture(scope="module")
def images():
    return SyntheticImages(num_images=10, img_size=16, in_chans=1, seed=0)


def pooled_reference(model, dataset):
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 17, D), class token last
        emb = model._insert_cls(model.backbone.embed(x))
        block1, _ = model.backbone.forward_blocks(emb, list(model.orders), stop_after=1)
    return tokens[:, :16].mean(1), tokens[:, 16], block1[:, :16].mean(1), block1[:, 16]


def test_extract_features_shapes_values_and_no_leaks(tiny_model, images):
    model = tiny_model
    model.train()
    model.backbone.patch_embed.proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    avg, cls, avg1, cls1 = pooled_reference(model, images)
    model.train()

    f, y = extract_features(model, images, batch_size=4, progress=False)
    assert f.shape == (10, 32) and f.dtype == torch.float32 and not f.requires_grad
    assert y.dtype == torch.int64 and y.tolist() == [images[i][1] for i in range(10)]
    assert torch.allclose(f, avg, atol=1e-5)
    with torch.no_grad():  # the model's own pooling (avg over patch tokens) agrees
        head = model.eval().forward_head(model.forward_features(
            torch.stack([images[i][0] for i in range(10)])), pre_logits=True)
    model.train()
    assert torch.allclose(f, head, atol=1e-5)

    fc, _ = extract_features(model, images, batch_size=3, pool="cls", progress=False)
    assert fc.shape == (10, 32) and torch.allclose(fc, cls, atol=1e-5)

    taps, _ = extract_features(model, images, batch_size=4, layers=[1, 2], progress=False)
    assert taps.shape == (10, 2 * 32)
    assert torch.allclose(taps[:, :32], avg1, atol=1e-5)
    assert torch.allclose(taps[:, 32:], f, atol=1e-5)  # layer 2 = the last block = layers None
    swapped, _ = extract_features(model, images, batch_size=4, layers=[2, 1], progress=False)
    assert torch.allclose(swapped, torch.cat([taps[:, 32:], taps[:, :32]], 1))
    tap_cls, _ = extract_features(model, images, layers=[1], pool="cls", progress=False)
    assert torch.allclose(tap_cls, cls1, atol=1e-5)

    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    extract_features(model, images, batch_size=5, progress=False)
    assert not model.training
    with pytest.raises(ValueError, match="layers"):
        extract_features(model, images, layers=[3], progress=False)


def test_cls_pool_needs_a_class_token(images):
    model = tiny_classifier(class_token="none")
    with pytest.raises(ValueError, match="class token"):
        extract_features(model, images, pool="cls", progress=False)


# ------------------------------------------------------------------------ top level

def test_raw_pixel_baseline_beats_chance():
    g = torch.Generator().manual_seed(9)
    means = torch.randn(4, 1, 8, 8, generator=g)  # one mean image per class

    def make(n):
        y = torch.randint(4, (n,), generator=g)
        return TensorDataset(means[y] + 1.5 * torch.randn(n, 1, 8, 8, generator=g), y)

    out = raw_pixel_baseline(make(200), make(100),
                             ProbeConfig(weight_decays=(1e-4, 1e-2, 1.0), knn_k=10))
    assert out["n_train"] == 200 and out["n_test"] == 100 and out["feature_dim"] == 64
    assert out["linear_probe_top1"] > 70 and out["knn_top1"] > 60, out  # chance: 25
    assert out["weight_decay"] in (1e-4, 1e-2, 1.0) and len(out["sweep"]) == 3


def test_evaluate_representation_from_a_pretraining_checkpoint():
    torch.manual_seed(0)
    pre = star_mamba.create_pretrain_model("star_tiny", **TINY, **TINY_DECODER)
    ckpt = {"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}
    model = classifier_from_pretrained(ckpt)
    assert model.cfg.directions == 1 and model.cls_index is None
    assert torch.equal(model.backbone.patch_embed.proj.weight, pre.encoder.patch_embed.proj.weight)
    train = SyntheticImages(num_images=40, img_size=16, in_chans=1, seed=1)
    test = SyntheticImages(num_images=20, img_size=16, in_chans=1, seed=2)
    out = evaluate_representation(ckpt, train, test, ProbeConfig(batch_size=20,
                                  weight_decays=(1e-3, 1e-1), knn_k=5), device="cpu",
                                  progress=False)
    for key in ("linear_probe_top1", "knn_top1", "weight_decay", "n_train", "n_test",
                "feature_dim", "seconds"):
        assert key in out
    assert (out["n_train"], out["n_test"], out["feature_dim"]) == (40, 20, 32)
    assert 0 <= out["linear_probe_top1"] <= 100 and 0 <= out["knn_top1"] <= 100
    with pytest.raises(ValueError, match="backbone"):
        classifier_from_pretrained({"model": {}, "model_config": pre.cfg.to_dict()})


# ------------------------------------------------------------------------ scored on the test split

def shifted_labels(y, num_classes):
    """The training split's labels rotated by one class: a probe fitted on them predicts the
    wrong class for every test point of the same clusters."""
    return (y + 1) % num_classes


def test_probes_are_scored_on_the_test_split_not_the_training_split():
    """Well separated blobs; the training labels are the test labels rotated by one class. A
    probe scored on the test split gets (almost) every test point wrong, and its own training
    accuracy is (almost) perfect: scoring the training split would report that instead."""
    x, y = blobs(60, torch.eye(3, 8) * 6.0, 0.5, seed=11)
    test_x, test_y = blobs(40, torch.eye(3, 8) * 6.0, 0.5, seed=12)
    out = probe_features(x.float(), shifted_labels(y, 3), test_x.float(), test_y,
                         ProbeConfig(weight_decays=(1e-4, 1e-2), knn_k=5))
    assert out["linear_probe_train_top1"] > 95
    assert out["linear_probe_top1"] < 5 and out["knn_top1"] < 5, out
    assert (out["n_train"], out["n_test"]) == (180, 120)


def test_evaluate_representation_scores_the_test_set():
    """The same images as train and test set, the training copy with rotated labels: 1-NN finds
    each test image itself (its rotated label: 0% against the true one), and the linear probe
    that fits the rotated labels scores its training accuracy's complement on the test set."""
    torch.manual_seed(0)
    pre = star_mamba.create_pretrain_model("star_tiny", **TINY, **TINY_DECODER)
    ckpt = {"model": pre.state_dict(), "model_config": pre.cfg.to_dict()}
    images = SyntheticImages(num_images=30, img_size=16, in_chans=1, seed=3)
    xs = torch.stack([images[i][0] for i in range(30)])
    labels = torch.arange(30) % 3
    train = TensorDataset(xs, shifted_labels(labels, 3))
    test = TensorDataset(xs, labels)
    out = evaluate_representation(ckpt, train, test, ProbeConfig(batch_size=10, knn_k=1,
                                  knn_temperature=None, weight_decays=(1e-6,)), device="cpu",
                                  progress=False)
    assert out["knn_top1"] == 0.0
    assert out["linear_probe_train_top1"] > 90  # 30 points in 32 dimensions: fitted
    # a prediction right on the training copy is wrong on the test copy
    assert out["linear_probe_top1"] <= 100 - out["linear_probe_train_top1"] + 1e-9
