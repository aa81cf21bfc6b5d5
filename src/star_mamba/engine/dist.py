"""Process-group helpers: the same code runs as one process or under ``torchrun``."""
from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL on GPU, gloo on CPU. Without torchrun's variables this is a single process.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), env_local_rank())
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=_attempt_store(info), rank=info.rank,
                                world_size=info.world_size)
    return info


def _attempt_store(info: DistInfo) -> dist.Store:
    """The rendezvous store, namespaced by torchrun's restart count.

    After ``torchrun --max-restarts`` restarts a failed job, the agent's store still holds the
    dead attempt's keys (worker addresses); without a fresh namespace the new workers would try
    to connect to processes that no longer exist.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, info.world_size, is_master=info.rank == 0 and not agent_hosts,
                          timeout=timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"star_mamba/attempt{attempt}", store)


def env_local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(name: str, local_rank: int = 0, cuda_count: int = 0) -> torch.device:
    """The device ``run.device`` names, for the process with this ``local_rank`` on a node with
    ``cuda_count`` GPUs (a pure function: nothing is selected or initialised).

    ``auto`` is ``cuda`` when there is a GPU, else ``cpu``; ``cuda`` without an index is this
    process's GPU ``cuda:<local_rank>``; ``cuda:N`` is taken as given.
    """
    if name == "auto":
        name = "cuda" if cuda_count > 0 else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"invalid run.device={name!r}; allowed: 'auto', 'cpu', 'cuda', "
                         "'cuda:N'") from e
    if device.type != "cuda":
        return device
    if cuda_count == 0:
        raise ConfigError(f"invalid config: run.device={name!r} but no CUDA device is available")
    index = local_rank if device.index is None else device.index
    if index >= cuda_count:
        raise ConfigError(f"invalid config: run.device={name!r} resolves to cuda:{index} (LOCAL_RANK={local_rank}) "
                         f"but this node has {cuda_count} CUDA device(s)")
    return torch.device("cuda", index)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer; a sync point)."""
    if dist.is_available() and dist.is_initialized():
        return all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0
    return flag


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
