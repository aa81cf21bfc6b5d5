"""FLOPs of a training step, counted honestly: what MFU is computed from.

``torch.utils.flop_counter`` counts GEMMs, convolutions and attention from their shapes, but as
shipped it (1) ignores ``groups`` in the convolution backward, so the mixer's depthwise causal
conv1d (groups = channels) is counted as if it were a dense conv, about 769x its forward
instead of 2x at STAR-B's width (the GPU acceptance run's MFU was over-stated by 8.5% through
it), and (2) has no formula for the CPU attention kernels
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward), so on CPU the decoder's
attention is not counted at all. :func:`step_flops` fixes both with formulas of its own and
adds the selective scan (a custom op or a Python loop the counter does not see) analytically.

Attention is counted dense: every score of the (Lq, Lk) matrix, the masked ones included, as
the dense kernels compute them; :func:`masked_score_fraction` says what share of those a
block-causal mask throws away (a block-sparse kernel would skip them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils import flop_counter as fc

aten = torch.ops.aten


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None) -> int:
    """The convolution backward: the input gradient and the weight gradient each cost one
    forward's FLOPs (``conv_flop_count`` already divides by ``groups`` through the weight's
    shape (C_out, C_in / groups, k...)); the bias gradient is a sum, not counted."""
    forward = fc.conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def cpu_sdpa_flops(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    """CPU attention forward (dense: Q K^T and P V over every score)."""
    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *_args,
                            out_shape=None, **_kwargs) -> int:
    """CPU attention backward (dense), as torch counts the CUDA kernels' backward."""
    return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _cpu_attention_ops() -> dict:
    ops = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", cpu_sdpa_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward",
                           cpu_sdpa_backward_flops)):
        op = getattr(aten, name, None)
        if op is not None:  # absent from older builds
            ops[op] = formula
    return ops


FORMULAS = {aten.convolution_backward: conv_backward_flops, **_cpu_attention_ops()}
"""The formulas :func:`counter` adds to or replaces in torch's registry."""


def counter() -> fc.FlopCounterMode:
    """A ``FlopCounterMode`` with :data:`FORMULAS` (silent)."""
    return fc.FlopCounterMode(display=False, custom_mapping=FORMULAS)


def scan_flops(tokens: int, d_inner: int, d_state: int, layers: int, directions: int = 1) -> int:
    """The selective scan's FLOPs for forward + backward (not seen by the counter): per state
    element and token about 6 forward (exp of dt * A, two multiplies and an add for the
    recurrence, a multiply-add for the output), backward about twice that."""
    return 3 * 6 * tokens * d_inner * d_state * layers * directions


@dataclass
class StepFlops:
    """One forward + backward of a pretraining step."""

    counted: int  # GEMMs, convolutions (groups honoured), attention (dense, on every device)
    scan: int  # the selective scan, analytic
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.counted + self.scan


def step_flops(model: Any, images: torch.Tensor) -> StepFlops:
    """FLOPs of ``model(images).loss.backward()`` for a :class:`~star_mamba.models.pretrain.
    StarPretrain` (its gradients are cleared again)."""
    with counter() as mode:
        model(images).loss.backward()
    model.zero_grad(set_to_none=True)
    cfg = model.cfg
    tokens = ((images.shape[0] // cfg.images_per_sequence) * (cfg.num_segments - 1)
              * cfg.tokens_per_segment)
    by_op = {str(op): int(n) for op, n in mode.get_flop_counts().get("Global", {}).items()}
    return StepFlops(int(mode.get_total_flops()), scan_flops(tokens, cfg.d_inner, cfg.d_state,
                                                             cfg.depth), by_op)


def masked_score_fraction(mask: Optional[torch.Tensor]) -> float:
    """Share of attention scores a boolean mask (True = attend) throws away (0 without one)."""
    if mask is None:
        return 0.0
    return 1.0 - mask.float().mean().item()


__all__ = ["FORMULAS", "StepFlops", "conv_backward_flops", "counter", "masked_score_fraction",
           "scan_flops", "step_flops"]
