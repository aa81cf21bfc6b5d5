"""Fixed 2D sin-cos position tables (as in MAE and ARM), and a table resized to another grid."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(M,) positions -> (M, dim): half sines, half cosines over geometric frequencies."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim/2,)
    angles = positions.double().reshape(-1, 1) * omega  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """(h*w, dim) float32 table for a grid in raster order; first half encodes rows, second columns."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {dim}")
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)  # (h*w,)
    cols = torch.arange(w).repeat(h)  # (h*w,)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1).float()


def interpolate_pos_embed(table: Tensor, old_grid: tuple[int, int],
                          new_grid: tuple[int, int]) -> Tensor:
    """(1, h*w, D) -> (1, h'*w', D) by bicubic interpolation over the grid; same grid: unchanged."""
    if tuple(old_grid) == tuple(new_grid):
        return table
    (h, w), (nh, nw) = old_grid, new_grid
    d = table.shape[-1]
    grid = table.reshape(1, h, w, d).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, nh * nw, d).to(table.dtype)
