"""Activation checkpointing (``set_grad_checkpointing``, ``run.grad_checkpointing``): the same
gradients as the plain backward, with fewer bytes saved for it."""
import pytest
import torch

from .conftest import PRETRAIN_RUN, micro_pretrain, tiny_classifier


def _grads_and_saved_bytes(model, images, enable: bool, loss_of):
    model.train()
    model.set_grad_checkpointing(enable)
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(3)  # drop path draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model(images))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("kind", ["pretrain", "classifier"])
def test_checkpointed_gradients_equal_the_plain_ones(kind):
    if kind == "pretrain":
        model, loss_of = micro_pretrain(drop_path_rate=0.2), (lambda out: out.loss)
        images = torch.randn(4, model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size)
    else:
        model, loss_of = tiny_classifier(drop_path_rate=0.2), (lambda out: out.square().mean())
        images = torch.randn(3, 1, 16, 16)
    plain, plain_bytes = _grads_and_saved_bytes(model, images, False, loss_of)
    checked, checked_bytes = _grads_and_saved_bytes(model, images, True, loss_of)
    assert plain.keys() == checked.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert checked_bytes < 0.7 * plain_bytes  # the blocks' activations are not kept


def test_run_option_turns_it_on(tmp_path):
    from star_mamba.engine.config import load_config
    from star_mamba.tasks import run_task
    cfg = load_config(None, [*PRETRAIN_RUN, "optim.epochs=1", "run.max_steps=2",
                             "run.grad_checkpointing=true", f"run.output_dir={tmp_path}"],
                      task="pretrain")
    summary = run_task(cfg)
    assert summary["step"] == 2
    assert (tmp_path / "config.yaml").read_text().count("grad_checkpointing: true") == 1
