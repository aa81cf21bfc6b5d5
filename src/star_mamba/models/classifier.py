"""Image classifier over the STAR backbone (fine-tuning and evaluation), with timm's surface."""
from __future__ import annotations

from typing import Optional, Union

import torch
from timm.layers import trunc_normal_
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from ..config import StarConfig
from ..sequence import direction_orders
from .backbone import StarBackbone
from .init import TOKEN_STD, init_head_


def take_indices(depth: int, indices: Optional[Union[int, list[int]]]) -> tuple[list[int], int]:
    """timm's tap convention: None = every block, an int n = the last n, a list = those blocks
    (negative from the end). Returns the 0-based blocks and the largest."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"last-n taps ({indices}) out of range: 1 to {depth}")
        take = list(range(depth - indices, depth))
    else:
        take = [i + depth if i < 0 else i for i in indices]
        if bad := [i for i in indices if not -depth <= i < depth]:
            raise ValueError(f"tap indices {bad} out of range: 0 to {depth - 1} (or -{depth} to -1)")
    if not take:
        raise ValueError("no taps asked for: give at least one block index")
    return take, max(take)


class StarClassifier(nn.Module, PyTorchModelHubMixin, library_name="star-mamba",
                     tags=["image-classification", "mamba", "star"]):
    """Raster-order tokens (+ optional class token) -> multi-direction MambaMLP stack -> head.

    ``class_token``: ``none``, ``middle`` (ARM) or ``end`` (reported for STAR);
    ``global_pool``: ``avg`` over patch tokens, ``cls`` or ``''`` (none: the head reads every
    token). With ``dynamic_img_size`` any image size that is a multiple of the patch runs: the
    position table is interpolated to its grid and the scan orders are built for it.
    """

    def __init__(self, cfg: StarConfig | dict):
        super().__init__()
        cfg = cfg if isinstance(cfg, StarConfig) else StarConfig.from_dict(cfg)  # hub: a dict
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = self.head_hidden_size = cfg.embed_dim  # no pre-logits layer
        self.global_pool = cfg.global_pool
        self.backbone = StarBackbone(cfg)
        self.cls_index = self._cls_at(cfg.num_patches)  # for the config's grid
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
                          if self.cls_index is not None else None)
        orders = direction_orders(self.backbone.grid, cfg.directions, self.cls_index)
        self.register_buffer("orders", torch.stack(orders), persistent=False)  # (dirs, L)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.feature_info = [dict(num_chs=cfg.embed_dim, reduction=cfg.patch_size,
                                  module=f"backbone.blocks.{i}") for i in range(cfg.depth)]
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=TOKEN_STD)
        init_head_(self.head)

    def _cls_at(self, num_patches: int) -> Optional[int]:
        """The class token's index among ``num_patches`` patch tokens (None: no class token)."""
        return {"none": None, "middle": num_patches // 2, "end": num_patches}[self.cfg.class_token]

    def _orders(self, grid: tuple[int, int]) -> Optional[Tensor]:
        """Scan orders (directions, L) for a patch grid (None for one direction): the buffer for
        the config's grid, built for another one (``dynamic_img_size``)."""
        if self.cfg.directions == 1:
            return None
        if grid == self.backbone.grid:
            return self.orders
        orders = direction_orders(grid, self.cfg.directions, self._cls_at(grid[0] * grid[1]))
        return torch.stack(orders).to(self.orders.device)

    def _insert_cls(self, x: Tensor) -> Tensor:
        if self.cls_token is None:
            return x
        i = self._cls_at(x.shape[1]) if self.cfg.dynamic_img_size else self.cls_index
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :i], cls, x[:, i:]], dim=1)  # (B, N+1, D)

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> final-normed tokens (B, L, D), L = N (+1 with a class token)."""
        x = self._insert_cls(self.backbone.embed(images))
        x, _ = self.backbone.forward_blocks(x, self._orders(self.backbone.grid_of(images)))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, L, D) tokens -> logits (B, num_classes), or pooled features with ``pre_logits``;
        with ``global_pool=''`` no pooling: (B, L, num_classes) or the tokens."""
        if self.global_pool == "cls":
            x = x[:, self._cls_index_in(x)]
        elif self.global_pool == "avg":  # the patch tokens only
            x = self._split_cls(x)[1].mean(dim=1)
        return x if pre_logits else self.head(x)

    def _split_cls(self, x: Tensor) -> tuple[Optional[Tensor], Tensor]:
        """(B, L, D) -> (class token (B, 1, D) or None, patch tokens (B, N, D) in raster order)."""
        if self.cls_index is None:
            return None, x
        i = self._cls_index_in(x)
        return x[:, i:i + 1], torch.cat([x[:, :i], x[:, i + 1:]], dim=1)

    def _cls_index_in(self, x: Tensor) -> Optional[int]:
        """The class token's index in (B, L, D) tokens (for the input's grid when dynamic)."""
        if self.cls_index is None or not self.cfg.dynamic_img_size:
            return self.cls_index
        return self._cls_at(x.shape[1] - 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    # ------------------------------------------------------------ dense-task feature taps
    def forward_intermediates(
            self, images: Tensor, indices: Optional[Union[int, list[int]]] = None,
            return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
            output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> Union[list, tuple[Tensor, list]]:
        """timm's feature taps: the outputs of the chosen blocks (0-based; an int n = the last n).

        Each tap is (B, D, H/p, W/p) with ``output_fmt="NCHW"`` or (B, N, D) with ``"NLC"``,
        patch tokens only, in raster order; with ``return_prefix_tokens`` a tap is
        ``(spatial, class_token (B, 1, D))``. ``norm`` passes every tap through the final norm.
        Returns the taps, or ``(final-normed tokens (B, L, D), taps)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"invalid output_fmt={output_fmt!r}; allowed values are NCHW, NLC")
        take, max_index = take_indices(len(self.backbone.blocks), indices)
        grid = self.backbone.grid_of(images)
        x = self._insert_cls(self.backbone.embed(images))  # (B, L, D)
        final, taps = self.backbone.forward_blocks(  # taps in block order, 1-based
            x, self._orders(grid), taps=[i + 1 for i in sorted(set(take))],
            stop_after=max_index + 1 if stop_early else None)
        out = [self._split_tap(self.backbone.norm(t) if norm else t, grid, output_fmt,
                               return_prefix_tokens) for t in taps]
        return out if intermediates_only else (final, out)

    def _split_tap(self, x: Tensor, grid: tuple[int, int], output_fmt: str, with_prefix: bool):
        """(B, L, D) -> patch tokens as NCHW/NLC (+ the class token)."""
        prefix, x = self._split_cls(x)
        if output_fmt == "NCHW":
            h, w = grid
            x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)
        return (x, prefix) if with_prefix else x

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last tap (and the final norm / head); returns the taps.

        ``cfg`` follows (``depth``, ``final_norm``, ``num_classes``), so ``save_pretrained`` then
        ``from_pretrained`` rebuilds the pruned model."""
        take, max_index = take_indices(len(self.backbone.blocks), indices)
        self.backbone.blocks = self.backbone.blocks[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        changes: dict = dict(depth=max_index + 1)
        if prune_norm:
            self.backbone.norm = nn.Identity()
            changes["final_norm"] = False
        self._set_cfg(self.cfg.replace(**changes))
        if prune_head:
            self.reset_classifier(0)
        return take

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head (0: none) and optionally another pooling (``''``: none); ``cfg`` follows."""
        cfg = self.cfg.replace(num_classes=num_classes,
                               **({} if global_pool is None else dict(global_pool=global_pool)))
        self._set_cfg(cfg)
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()

    def _set_cfg(self, cfg: StarConfig) -> None:
        """Keep ``cfg`` (and the config ``save_pretrained`` writes) in step with the modules."""
        self.cfg = cfg
        self.backbone.cfg = cfg
        self._hub_mixin_config = {**(self._hub_mixin_config or {}), "cfg": cfg.to_dict()}

    def get_classifier(self) -> nn.Module:
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^backbone\.pos_embed|^backbone\.patch_embed",
                    blocks=[(r"^backbone\.blocks\.(\d+)", None), (r"^backbone\.norm", (99999,))])
