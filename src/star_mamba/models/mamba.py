"""Mamba-1 mixer with 1, 2 or 4 scan directions and a recurrent step.

Each direction has its own selective-SSM branch (causal depthwise conv, x_proj, dt_proj, A_log,
D); in_proj and out_proj are shared, and the directions' outputs are averaged (ARM's fine-tuning
mixer; with one direction it is exactly Mamba-1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn

from ..config import StarConfig
from ..ops import selective_scan
from ..sequence import inverse_order


@dataclass
class MambaState:
    """Recurrent state of one mixer: the conv window and the SSM state."""

    conv: Tensor  # (B, E, d_conv)
    ssm: Tensor  # (B, E, N)


class SSMBranch(nn.Module):
    """One scan direction: causal depthwise conv -> SiLU -> selective scan, gated by z."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_scale: float = 1.0, conv_bias: bool = True):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.dt_range, self.dt_init_floor, self.dt_scale = (dt_min, dt_max), dt_init_floor, dt_scale
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's own initialisation of the SSM (model-wide schemes leave it to this):
        ``dt_proj`` keeps the variance of its input, its bias is the inverse softplus of a dt
        drawn log-uniformly in [dt_min, dt_max]; A = -(1..N) for every channel; D = 1."""
        (dt_min, dt_max), d_inner = self.dt_range, self.d_inner
        std = self.dt_rank ** -0.5 * self.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # (E, N)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    def forward(self, x: Tensor, z: Tensor, backend: str = "auto") -> Tensor:
        """x, z: (B, E, L) in this branch's scan order -> y: (B, E, L)."""
        L = x.shape[-1]
        x = F.silu(self.conv1d(x)[..., :L])  # (B, E, L) causal conv
        x_dbl = self.x_proj(x.mT)  # (B, L, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).mT  # (B, E, L); bias is added inside the scan
        A = -torch.exp(self.A_log.float())  # (E, N)
        return selective_scan(x, dt, A, B.mT.contiguous(), C.mT.contiguous(), D=self.D.float(),
                              z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                              backend=backend)  # (B, E, L)

    def step(self, x: Tensor, z: Tensor, state: MambaState) -> Tensor:
        """One token: x, z (B, E) -> y (B, E); updates ``state`` in place."""
        state.conv.copy_(torch.roll(state.conv, shifts=-1, dims=-1))
        state.conv[:, :, -1] = x
        x = (state.conv * self.conv1d.weight.squeeze(1)).sum(-1)  # (B, E)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # (B, E)
        A = -torch.exp(self.A_log.float())  # (E, N)
        dA = torch.exp(dt.unsqueeze(-1) * A)  # (B, E, N)
        state.ssm.copy_(state.ssm * dA + (dt * x).unsqueeze(-1) * B.unsqueeze(1))
        y = (state.ssm @ C.unsqueeze(-1)).squeeze(-1) + self.D * x  # (B, E)
        return y * F.silu(z)


@register_notrace_module  # a leaf to torch.fx (timm's tracers): the scan is not traceable
class Mamba(nn.Module):
    """Mamba-1 mixer over (B, L, D) sequences with ``directions`` scan orders."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 dt_rank: Optional[int] = None, directions: int = 1, scan_backend: str = "auto",
                 bias: bool = False, conv_bias: bool = True):
        super().__init__()
        if directions not in (1, 2, 4):
            raise ValueError(f"invalid directions={directions!r}; allowed values are 1, 2, 4")
        self.d_model, self.directions, self.scan_backend = d_model, directions, scan_backend
        self.d_inner = expand * d_model
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.branches = nn.ModuleList(
            SSMBranch(self.d_inner, d_state, d_conv, dt_rank, conv_bias=conv_bias)
            for _ in range(directions))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    @classmethod
    def from_config(cls, cfg: StarConfig) -> "Mamba":
        """The mixer of a STAR block (dt_rank as the config resolves it)."""
        return cls(cfg.embed_dim, cfg.d_state, cfg.d_conv, cfg.expand, cfg.resolved_dt_rank,
                   cfg.directions, cfg.scan_backend)

    def forward(self, hidden: Tensor, orders: Optional[Sequence[Tensor]] = None) -> Tensor:
        """hidden: (B, L, D) -> (B, L, D).

        ``orders``: one permutation of range(L) per direction (see
        ``star_mamba.sequence.direction_orders``); default: forward, then reversed. Each branch
        scans the sequence in its order, its output is mapped back, and the outputs are averaged.
        """
        xz = self.in_proj(hidden)  # (B, L, 2E)
        x, z = xz.mT.chunk(2, dim=1)  # (B, E, L) each
        if self.directions == 1 and orders is None:
            y = self.branches[0](x, z, self.scan_backend)  # (B, E, L)
            return self.out_proj(y.mT)
        orders = self._check_orders(orders, hidden.shape[1], hidden.device)
        y = 0
        for branch, order in zip(self.branches, orders):
            y_o = branch(x[..., order], z[..., order], self.scan_backend)  # (B, E, L) scan order
            y = y + y_o[..., inverse_order(order)]  # back to input order
        return self.out_proj((y / self.directions).mT)  # (B, L, D)

    def _check_orders(self, orders: Optional[Sequence[Tensor]], L: int, device) -> list[Tensor]:
        if orders is None:
            if self.directions == 4:
                raise ValueError("a 4-direction mixer needs explicit scan orders (the transposed "
                                 "grid is not defined by the sequence alone)")
            forward = torch.arange(L, device=device)
            orders = [forward, forward.flip(0)]
        if len(orders) != self.directions:
            raise ValueError(f"got {len(orders)} scan orders for a mixer with "
                             f"directions={self.directions}")
        return [o.to(device) for o in orders]

    # -------------------------------------------------------------- recurrent inference
    def allocate_state(self, batch_size: int, device=None, dtype=torch.float32) -> MambaState:
        branch = self.branches[0]
        return MambaState(
            conv=torch.zeros(batch_size, self.d_inner, branch.d_conv, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, branch.d_state, device=device, dtype=dtype))

    def step(self, hidden: Tensor, state: MambaState) -> Tensor:
        """One token of a causal mixer: hidden (B, D) -> (B, D); updates ``state`` in place."""
        if self.directions != 1:
            raise ValueError("step() runs a causal mixer; this one has "
                             f"directions={self.directions}")
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, E) each
        return self.out_proj(self.branches[0].step(x, z, state))
