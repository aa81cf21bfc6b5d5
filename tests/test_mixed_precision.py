"""bf16 autocast on every CPU scan backend: the pretraining and fine-tuning steps train.

The scan computes in float32 inside and returns the dtype autocast gave it; these tests run the
steps a GPU run takes (run.amp=bf16 is the GPU default) on CPU, where bf16 autocast exists too.
"""
import pytest
import torch

import star_mamba
from star_mamba.tasks.pretrain import pretrain
from star_mamba.ops import available_backends

from .conftest import TINY, TINY_DECODER, pretrain_config, tiny_classifier

BACKENDS = [b for b in available_backends("cpu") if b != "triton"]


def _step(model, images, targets, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model(images)
        loss = out.loss if targets is None else torch.nn.functional.cross_entropy(out.float(), targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads


def _compare(model, images, targets=None):
    loss32, g32 = _step(model, images, targets, amp=False)
    loss16, g16 = _step(model, images, targets, amp=True)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) <= 0.03 * abs(loss32.item()), (loss16, loss32)
    assert set(g16) == set(g32) == {n for n, p in model.named_parameters()}
    for name, g in g16.items():
        assert torch.isfinite(g).all(), name
    # the gradient direction survives bf16 (cosine over all parameters)
    flat16 = torch.cat([g.flatten() for g in g16.values()])
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.95


@pytest.mark.parametrize("backend", BACKENDS)
def test_pretraining_step_in_bf16(backend):
    torch.manual_seed(0)
    model = star_mamba.create_pretrain_model("star_tiny", scan_backend=backend, **TINY,
                                             **TINY_DECODER)
    _compare(model, torch.randn(8, 1, 16, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_classifier_step_in_bf16(backend):
    model = tiny_classifier(scan_backend=backend, num_classes=5)
    _compare(model, torch.randn(6, 1, 16, 16), torch.arange(6) % 5)


@pytest.mark.parametrize("accum", [1, 2])
def test_bf16_pretraining_run_tracks_float32(tmp_path, accum):
    """Through the engine (run.amp=bf16, optim.accum_iter): the loss curve stays within a few
    percent of the float32 run's."""
    losses = {}
    for amp in ("off", "bf16"):
        cfg = pretrain_config(tmp_path / amp, "optim.epochs=1", "optim.lr=1e-3",
                          f"optim.accum_iter={accum}", f"optim.batch_size={8 // accum}",
                          f"run.amp={amp}")
        summary = pretrain(cfg)
        assert summary["step"] == 8
        losses[amp] = summary["loss"]
    assert abs(losses["bf16"] - losses["off"]) <= 0.03 * losses["off"], losses
