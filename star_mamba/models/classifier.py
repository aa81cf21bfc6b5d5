"""Image classifier over the STAR backbone (fine-tuning and evaluation), with timm's surface."""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import trunc_normal_
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from ..config import StarConfig
from ..sequence import direction_orders
from .backbone import StarBackbone


class StarClassifier(nn.Module, PyTorchModelHubMixin, library_name="star-mamba",
                     tags=["image-classification", "mamba", "star"]):
    """Raster-order tokens (+ optional class token) -> multi-direction MambaMLP stack -> head.

    ``class_token``: ``none``, ``middle`` (ARM) or ``end`` (reported for STAR);
    ``global_pool``: ``avg`` over patch tokens or ``cls``.
    """

    def __init__(self, cfg: StarConfig | dict):
        super().__init__()
        cfg = cfg if isinstance(cfg, StarConfig) else StarConfig.from_dict(cfg)  # hub: a dict
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim
        self.global_pool = cfg.global_pool
        self.backbone = StarBackbone(cfg)
        n = cfg.num_patches
        self.cls_index = {"none": None, "middle": n // 2, "end": n}[cfg.class_token]
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
                          if self.cls_index is not None else None)
        orders = direction_orders(self.backbone.grid, cfg.directions, self.cls_index)
        self.register_buffer("orders", torch.stack(orders), persistent=False)  # (dirs, L)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def _insert_cls(self, x: Tensor) -> Tensor:
        if self.cls_token is None:
            return x
        i = self.cls_index
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :i], cls, x[:, i:]], dim=1)  # (B, N+1, D)

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> final-normed tokens (B, L, D), L = N (+1 with a class token)."""
        x = self._insert_cls(self.backbone.embed(images))
        orders = None if self.cfg.directions == 1 else list(self.orders)
        x, _ = self.backbone.forward_blocks(x, orders)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, L, D) tokens -> logits (B, num_classes), or pooled features with ``pre_logits``."""
        if self.global_pool == "cls":
            x = x[:, self.cls_index]
        elif self.cls_index is None:
            x = x.mean(dim=1)
        else:  # average the patch tokens only
            i = self.cls_index
            x = torch.cat([x[:, :i], x[:, i + 1:]], dim=1).mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

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
