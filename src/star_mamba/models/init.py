"""Weight initialisation of the STAR models: one function per model part and scheme.

``StarConfig.init`` picks the scheme:

* ``arm`` (default): what ARM's code does (OliverRensu/ARM ``models_pretrain.py`` /
  ``models_finetune.py``, ``_init_weights`` and ``segm_init_weights``):

  - every encoder Linear keeps PyTorch's default (kaiming-uniform, a = sqrt(5)) and a zero bias;
    the SSM's own parameters (``dt_proj``, ``A_log``, ``D``) keep Mamba's initialisation
    (``SSMBranch.reset_parameters``); depthwise convs keep PyTorch's default;
  - the mixer's ``out_proj`` is re-drawn kaiming-uniform and divided by sqrt(depth) (GPT-2's
    scaled residual init, one residual per layer as ARM counts it);
  - the patch embedding is lecun-normal with a zero bias;
  - decoder blocks: xavier-uniform Linears with zero biases; ``enc2dec`` and the prediction
    Linear: PyTorch's default with zero biases;
  - LayerNorms: weight 1, bias 0; learned tokens (decoder query, separator query positions,
    class token): trunc-normal std 0.02; a separator embedding: normal std 0.02.

* ``trunc_normal``: timm's ViT scheme, this project's default before ARM's was matched: every
  Linear (but ``dt_proj``) trunc-normal std 0.02 with a zero bias, the patch embedding
  xavier-uniform as a Linear on the flattened patch. Kept so that the results made with it
  (``docs/ablation``, the first evidence run in git history) can be reproduced.

The classifier head is trunc-normal std 0.02 under both; fine-tuning from a pretrained
checkpoint re-draws it with ``run.head_init_std`` (ARM: 2e-5), see ``engine/finetune.py``.
"""
from __future__ import annotations

import math

import torch
from timm.layers import lecun_normal_, trunc_normal_
from torch import nn

from ..config import INIT_SCHEMES
from .mamba import SSMBranch

TOKEN_STD = 0.02  # learned tokens and tables (both schemes)


def _zero_bias(m: nn.Module) -> None:
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)


def _ssm_owned(module: nn.Module) -> set[int]:
    """ids of the Linears whose init is the SSM's own (``SSMBranch.dt_proj``)."""
    return {id(m.dt_proj) for m in module.modules() if isinstance(m, SSMBranch)}


def _reset_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def pytorch_default_linear_(m: nn.Linear) -> None:
    """PyTorch's own Linear weight init (kaiming-uniform, a = sqrt(5)), bias zero."""
    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
    _zero_bias(m)


def trunc_normal_linear_(m: nn.Linear, std: float = TOKEN_STD) -> None:
    trunc_normal_(m.weight, std=std)
    _zero_bias(m)


def init_backbone_(backbone: nn.Module, scheme: str) -> None:
    """Initialise a ``StarBackbone`` in place (patch embedding, blocks, final norm)."""
    _check(scheme)
    own = _ssm_owned(backbone)
    for m in backbone.modules():
        if isinstance(m, nn.Linear) and id(m) not in own:
            (pytorch_default_linear_ if scheme == "arm" else trunc_normal_linear_)(m)
    _reset_norms(backbone)
    proj = backbone.patch_embed.proj  # Conv2d(C, D, p, p)
    if scheme == "arm":
        lecun_normal_(proj.weight)
        depth = len(backbone.blocks)
        for block in backbone.blocks:
            out = block.mixer.out_proj.weight  # (D, E)
            nn.init.kaiming_uniform_(out, a=math.sqrt(5))
            with torch.no_grad():
                out.div_(math.sqrt(depth))
    else:
        w = proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


def init_decoder_(decoder: nn.Module, scheme: str) -> None:
    """Initialise a ``StarDecoder`` in place (enc2dec, cross-attention blocks, norm, pred)."""
    _check(scheme)
    if scheme == "arm":
        for m in decoder.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                _zero_bias(m)
        for m in (decoder.enc2dec, decoder.pred):
            pytorch_default_linear_(m)
    else:
        for m in decoder.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_linear_(m)
    _reset_norms(decoder)
    trunc_normal_(decoder.query_token, std=TOKEN_STD)


def init_separator_(sep_query_pos, sep_embed, scheme: str) -> None:
    """The pretraining model's separator parameters (either may be None)."""
    _check(scheme)
    if sep_query_pos is not None:
        trunc_normal_(sep_query_pos, std=TOKEN_STD)
    if sep_embed is not None:
        if scheme == "arm":
            nn.init.normal_(sep_embed.weight, std=TOKEN_STD)  # ARM's nn.Embedding init
        else:
            trunc_normal_(sep_embed.weight, std=TOKEN_STD)


def init_head_(head: nn.Module, std: float = TOKEN_STD) -> None:
    """A classifier head: trunc-normal weight with ``std``, zero bias (nothing for Identity)."""
    if isinstance(head, nn.Linear):
        trunc_normal_linear_(head, std)


def _check(scheme: str) -> None:
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"invalid init scheme {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")
