"""Sharded data parallelism (``run.parallel: fsdp``): PyTorch's FSDP2 (``fully_shard``).

Each residual block (the backbone's Mamba blocks, the decoder's cross-attention blocks) is one
FSDP unit, the root module the last: a block's parameters are gathered for its forward and
backward and freed after, and each rank keeps 1 / world_size of the parameters, gradients and
optimizer state. Under ``run.amp: bf16`` the gathered parameters are bf16 and gradients are
reduced in float32 (``MixedPrecisionPolicy``); otherwise everything stays float32.

Checkpoints stay the single ``.pth`` file of every other run: the model's full state dict (the
same keys and tensors a DDP run saves, so fine-tuning, evaluation and the Hub read it unchanged)
and the optimizer's full state keyed by parameter name, gathered from the shards
(``torch.distributed.checkpoint.state_dict``). Every rank reads the file on resume and keeps its
own shard, so a run resumes under any world size, and either way between ``ddp`` and ``fsdp``
(a DDP run's position-keyed optimizer state is keyed by name on the way in).

When to pick which: DDP (the default) keeps a full copy of the model, its gradients and AdamW's
two moments on every GPU (16 bytes per parameter in float32) and is the fastest while that fits;
FSDP divides those 16 bytes by the world size for an all-gather per block in the forward and the
backward and a reduce-scatter of the gradients, worth it when the model's state, not the
activations, fills the GPU (STAR-L/H at the paper's batch, or longer sequences beside them).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.blocks import CrossAttentionBlock, MambaMLPBlock

# The modules that become one FSDP unit each (every other parameter belongs to the root's unit).
SHARD_UNITS = (MambaMLPBlock, CrossAttentionBlock)


def _fsdp():
    """``fully_shard`` and ``MixedPrecisionPolicy`` (a clear error where torch lacks them)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as e:  # torch < 2.6 keeps them under _composable
        raise RuntimeError(f"run.parallel=fsdp needs torch >= 2.6 (FSDP2); this is torch "
                           f"{torch.__version__}: {e}") from None
    return fully_shard, MixedPrecisionPolicy


def shard_model(model: nn.Module, param_dtype: Optional[torch.dtype]) -> int:
    """Shard ``model`` in place over the default process group: each of its
    :data:`SHARD_UNITS` one unit, then the root; returns the number of units. ``param_dtype``:
    the dtype parameters are gathered in (bf16 under bf16 autocast; None keeps float32);
    gradients reduce in float32."""
    fully_shard, MixedPrecisionPolicy = _fsdp()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    units = [m for m in model.modules() if isinstance(m, SHARD_UNITS)]
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # The pretraining model returns views beside its loss (targets, the loss weights): FSDP2
    # warns at every forward that an in-place op on one would skip its hook. No task of ours
    # writes into a model's outputs (their losses are out of place), so the warning is noise.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return len(units)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(**kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on rank 0 (on the CPU; the other ranks get an empty dict).
    Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name, on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer,
                                    options=_options(full_state_dict=True, cpu_offload=True))


def keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    """Whether a saved optimizer state is keyed by parameter name (an FSDP run's) rather than
    by position (``Optimizer.state_dict()``, a DDP or one-process run's)."""
    groups = optimizer_state.get("param_groups", [])
    return bool(groups and groups[0]["params"] and isinstance(groups[0]["params"][0], str))


def name_keyed(optimizer_state: dict[str, Any], optimizer: torch.optim.Optimizer,
               model: nn.Module, path) -> dict[str, Any]:
    """A position-keyed optimizer state (``Optimizer.state_dict()``: parameter ``i`` is the
    ``i``-th of the saving optimizer's groups, in order) keyed by parameter name instead, for
    ``optimizer``, which the same code built over the same model (sharded or not), so its
    groups list the same parameters in the same order."""
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [p for g in optimizer.param_groups for p in g["params"]]
    saved_groups = optimizer_state["param_groups"]
    if ([len(g["params"]) for g in saved_groups]
            != [len(g["params"]) for g in optimizer.param_groups]):
        raise CheckpointError(f"{path}: its optimizer's parameter groups do not match this "
                              "run's model and optim settings (optim.layer_decay, "
                              "optim.weight_decay); resume with the run's own config")
    position = {i: names[id(ours[k])] for k, i in
                enumerate(i for g in saved_groups for i in g["params"])}
    return dict(state={position[i]: v for i, v in optimizer_state["state"].items()},
                param_groups=[{**g, "params": [position[i] for i in g["params"]]}
                              for g in saved_groups])


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                    model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    path) -> None:
    """Load a full model state and optimizer state (each rank holds both; a position-keyed
    optimizer state is keyed by name first) into a sharded or a plain model; each rank keeps
    its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    if not keyed_by_name(optimizer_state):
        optimizer_state = name_keyed(optimizer_state, optimizer, model, path)
    set_model_state_dict(model, model_state, options=_options(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, optimizer_state,
                             options=_options(full_state_dict=True))


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (collective), a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


__all__ = ["SHARD_UNITS", "full_model_state", "full_optimizer_state", "full_tensor",
           "keyed_by_name", "load_full_state", "name_keyed", "shard_model"]
