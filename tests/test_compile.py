"""torch.compile traces both models in one graph (the scan is a custom op) and matches eager."""
import copy

import pytest
import torch

import star_mamba
from star_mamba.ops import available_backends

from .conftest import TINY, TINY_DECODER, tiny_classifier

KERNELS = [b for b in available_backends("cpu") if b in ("torch", "numba")]


SMALL = dict(depth=1)  # one block each: compiling costs time per block, the checks do not need two


def _models(backend):
    torch.manual_seed(0)
    pre = star_mamba.create_pretrain_model("star_tiny", scan_backend=backend,
                                           **{**TINY, **TINY_DECODER, **SMALL, "decoder_depth": 1})
    cls = tiny_classifier(scan_backend=backend, num_classes=5, drop_path_rate=0.0,
                          directions=2, **SMALL)
    return [("pretrain", pre, torch.randn(4, 1, 16, 16)), ("classifier", cls, torch.randn(2, 1, 16, 16))]


def _loss(out):
    return out.loss if hasattr(out, "loss") else out.square().mean()


@pytest.mark.parametrize("backend", KERNELS)
def test_no_graph_break(backend):
    for name, model, images in _models(backend):
        explanation = torch._dynamo.explain(model)(images)
        assert explanation.graph_break_count == 0, (name, explanation.break_reasons)
        assert explanation.graph_count == 1, name


def test_compiled_equals_eager_forward_and_backward():
    """Inductor's code for the whole model (fullgraph) against eager, loss and every gradient."""
    torch._dynamo.reset()
    for name, model, images in _models(KERNELS[-1]):
        compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
        eager_loss = _loss(model(images))
        eager_loss.backward()
        compiled_loss = _loss(compiled(images))
        compiled_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6, msg=name)
        grads = dict(compiled.named_parameters())
        for pname, p in model.named_parameters():
            torch.testing.assert_close(grads[f"_orig_mod.{pname}"].grad, p.grad, rtol=1e-4,
                                       atol=1e-6, msg=f"{name}: {pname}")
