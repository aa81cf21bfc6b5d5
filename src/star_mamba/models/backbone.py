"""The STAR backbone: patch embedding, position table and a stack of MambaMLP blocks.

One class serves pretraining (1 causal direction, cluster-ordered packed sequences) and
fine-tuning (2 or 4 directions over raster order): callers embed, arrange the tokens as their
task needs, and run the blocks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from torch import Tensor, nn

from ..config import StarConfig
from .blocks import MambaMLPBlock
from .init import init_backbone_
from .mamba import MambaState
from .pos_embed import interpolate_pos_embed, sincos_2d


class StarBackbone(nn.Module):
    def __init__(self, cfg: StarConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.grid_size
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                      strict_img_size=not cfg.dynamic_img_size)
        table = sincos_2d(cfg.embed_dim, (g, g)).unsqueeze(0)  # (1, N, D)
        if cfg.learnable_pos_embed:
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table, persistent=False)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear rule
        self.blocks = nn.ModuleList(
MambaMLPBlock(cfg, dpr[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.grad_checkpointing = False
        init_backbone_(self, cfg.init)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.cfg.grid_size, self.cfg.grid_size)

    def grid_of(self, images: Tensor) -> tuple[int, int]:
        """The patch grid of (B, C, H, W) images: the config's, or with ``dynamic_img_size`` the
        images' own."""
        if not self.cfg.dynamic_img_size:
            return self.grid
        p = self.cfg.patch_size
        return images.shape[-2] // p, images.shape[-1] // p

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens in raster order, position table added
        (interpolated to the images' grid with ``dynamic_img_size``)."""
        pos = self.pos_embed
        if self.cfg.dynamic_img_size:
            pos = interpolate_pos_embed(pos, self.grid, self.grid_of(images))
        return self.patch_embed(images) + pos

    def embed_patches(self, patches: Tensor) -> Tensor:
        """Pixel patches (..., p*p*C) -> tokens (..., D) through the same patch embedding, no position."""
        proj = self.patch_embed.proj
        p, c = self.cfg.patch_size, self.cfg.in_chans
        x = patches.reshape(-1, p, p, c).permute(0, 3, 1, 2)  # (M, C, p, p): patchify's (p, p, C)
        x = proj(x.to(proj.weight.dtype)).flatten(1)  # (M, D)
        return x.reshape(*patches.shape[:-1], -1)

    def forward_blocks(self, x: Tensor, orders: Optional[Sequence[Tensor]] = None,
                       taps: Sequence[int] = (), stop_after: Optional[int] = None
                       ) -> tuple[Tensor, list[Tensor]]:
        """Run the blocks on (B, L, D) tokens.

        Returns the final-normed output (B, L, D) and the raw outputs of the 1-based blocks in
        ``taps`` (a list of (B, L, D), in the order given). ``stop_after``: run only blocks
        1..stop_after (the final norm then applies to block ``stop_after``'s output).
        """
        wanted = {t: None for t in taps}
        blocks = self.blocks if stop_after is None else self.blocks[:stop_after]
        for i, block in enumerate(blocks, start=1):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, orders, use_reentrant=False)
            else:
                x = block(x, orders)  # (B, L, D)
            if i in wanted:
                wanted[i] = x
        return self.norm(x), [wanted[t] for t in taps]

    def allocate_state(self, batch_size: int, device=None, dtype=torch.float32) -> list[MambaState]:
        return [b.mixer.allocate_state(batch_size, device, dtype) for b in self.blocks]

    def step(self, x: Tensor, states: list[MambaState]) -> Tensor:
        """One token through a causal backbone: (B, D) -> final-normed (B, D)."""
        for block, state in zip(self.blocks, states):
            x = block.step(x, state)
        return self.norm(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed"}
        names |= {n for n, _ in self.named_parameters() if n.endswith((".A_log", ".D"))}
        return names

