"""STAR pretraining model: packed sequence -> causal encoder -> cross-attention decoder -> MSE.

Reads like the pipeline in the README:
  images (B*K, C, H, W)
    -> tokens (B*K, N, D) + 2D sin-cos position, reordered cluster-first   [backbone.embed]
    -> packed with separators, (B, T, c^2, D); drop the last segment       [pack_segments]
    -> causal MambaMLP stack, taps at evenly spaced depths                 [backbone.forward_blocks]
    -> decoder queries of segments 1..T-1 cross-attend block-causally      [StarDecoder]
    -> pred (B, T-1, c^2, p*p*C) vs normalised target pixels, MSE          [forward_loss]

The per-patch squared error (``PretrainOutput.patch_loss``) is computed once, here; the loss,
the diagnostics and the figures all reduce it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.utils.checkpoint
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from ..config import StarConfig
from .. import sequence as seq
from .backbone import StarBackbone
from .blocks import CrossAttentionBlock, flex_block_mask
from .init import init_decoder_, init_separator_
from .pos_embed import sincos_2d


@dataclass
class PretrainOutput:
    loss: Tensor  # () mean squared error over the counted target patches
    pred: Tensor  # (B, T-1, c^2, p*p*C): pred[:, t] predicts segment t+1 from segments 0..t
    target: Tensor  # (B, T-1, c^2, p*p*C): the (normalised) pixels of segments 1..T-1
    loss_weight: Tensor  # (T-1,) 1 where the target counts in the loss, else 0
    patch_loss: Tensor  # (B, T-1, c^2) float32: squared error of each patch, mean over its values


class StarDecoder(nn.Module):
    """ARM's decoder: cross-attention only, block i reads encoder tap i.

    The taps are each normalised, concatenated and projected to ``n`` decoder-width memories.
    A tap of the last encoder block arrives already normalised by the backbone's final norm (so
    that norm is trained in pretraining and inherited by fine-tuning); the others get their own.
    """

    def __init__(self, cfg: StarConfig):
        super().__init__()
        n, d, dd = cfg.decoder_depth, cfg.embed_dim, cfg.decoder_dim
        self.tap_norms = nn.ModuleList(
            nn.Identity() if tap == cfg.depth else nn.LayerNorm(d, eps=cfg.norm_eps)
            for tap in cfg.taps)
        self.enc2dec = nn.Linear(n * d, n * dd)
        self.query_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(dd, cfg.decoder_heads, cfg.decoder_mlp_ratio, cfg.norm_eps)
            for _ in range(n))
        self.norm = nn.LayerNorm(dd, eps=cfg.norm_eps)
        self.pred = nn.Linear(dd, cfg.patch_dim)
        self.grad_checkpointing = False

    def forward(self, taps: Sequence[Tensor], query_pos: Tensor, mask: Tensor) -> Tensor:
        """taps: n x (B, L, D); query_pos: (1, L, Dd); mask: (L, L) bool -> (B, L, p*p*C)."""
        feats = torch.cat([norm(t) for norm, t in zip(self.tap_norms, taps)], dim=-1)  # (B, L, nD)
        memories = self.enc2dec(feats).chunk(len(self.blocks), dim=-1)  # n x (B, L, Dd)
        x = (self.query_token + query_pos).expand(taps[0].shape[0], -1, -1)  # (B, L, Dd)
        for block, memory in zip(self.blocks, memories):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, memory, mask, use_reentrant=False)
            else:
                x = block(x, memory, mask)
        return self.pred(self.norm(x))


class StarPretrain(nn.Module, PyTorchModelHubMixin, library_name="star-mamba",
                   tags=["self-supervised", "mamba", "star"]):
    """STAR pretraining: next-segment prediction over K images packed with separators."""

    def __init__(self, cfg: StarConfig | dict):
        super().__init__()
        cfg = cfg if isinstance(cfg, StarConfig) else StarConfig.from_dict(cfg)  # hub: a dict
        cfg.validate_pretraining()
        self.cfg = cfg
        c2, g = cfg.tokens_per_segment, cfg.grid_size
        self.encoder = StarBackbone(cfg)
        self.decoder = StarDecoder(cfg)
        self.layout = seq.segment_layout(cfg.clusters_per_image, cfg.separator_position,
                                         cfg.has_separator)
        self.register_buffer("layout_index", torch.tensor(self.layout), persistent=False)
        order = seq.cluster_order((g, g), cfg.cluster_size)
        self.register_buffer("order", order, persistent=False)  # (N,)
        sep_pixels = (seq.separator_patches(cfg.separator, cfg.cluster_size, cfg.patch_dim)
                      if cfg.has_separator else None)
        self.register_buffer("sep_pixels", sep_pixels, persistent=False)  # (c^2, p*p*C)
        self.sep_embed = nn.Embedding(1, cfg.embed_dim) if cfg.separator == "embedding" else None
        # separator_space 'token': the same zeros / ones / identity pattern over the D channels
        # of each token, given to the encoder directly (no patch embedding, no position)
        token_space = cfg.separator_space == "token" and cfg.separator in ("zeros", "ones", "identity")
        sep_tokens = (seq.separator_patches(cfg.separator, cfg.cluster_size, cfg.embed_dim)
                      if token_space else None)
        self.register_buffer("sep_tokens", sep_tokens, persistent=False)  # (c^2, D)
        # decoder queries: 2D sin-cos of the target patch, a learned table for separator targets;
        # query r reads row query_index[r] of [dec_pos; sep_query_pos] (built once, here)
        dec_pos = sincos_2d(cfg.decoder_dim, (g, g))[order]  # (N, Dd) cluster order
        self.register_buffer("dec_pos", dec_pos, persistent=False)  # (N, Dd)
        self.sep_query_pos = (nn.Parameter(torch.zeros(c2, cfg.decoder_dim))
                              if cfg.has_separator else None)
        rows = torch.arange(cfg.num_patches).reshape(1, cfg.clusters_per_image, c2)  # (1, G, c^2)
        sep_rows = torch.arange(cfg.num_patches, cfg.num_patches + c2) if cfg.has_separator else None
        query_index = self.pack(rows.expand(cfg.images_per_sequence, -1, -1), sep_rows)[0, 1:]
        self.register_buffer("query_index", query_index.flatten(), persistent=False)  # ((T-1)c^2,)
        T = cfg.num_segments
        self.register_buffer("mask", seq.block_causal_mask(T - 1, c2), persistent=False)
        is_sep = seq.separator_segment_mask(cfg.clusters_per_image, cfg.separator_position,
                                            cfg.has_separator, cfg.images_per_sequence)
        weight = (~is_sep[1:] | cfg.separator_loss).float()  # (T-1,) targets that count
        self.register_buffer("loss_weight", weight, persistent=False)
        init_decoder_(self.decoder, cfg.init)
        init_separator_(self.sep_query_pos, self.sep_embed, cfg.init)

    # ----------------------------------------------------------------- pipeline pieces
    def pack(self, per_image: Tensor, separator: Optional[Tensor]) -> Tensor:
        """(B*K, G, c^2, *X) clusters + (c^2, *X) separator (None without one) -> (B, T, c^2, *X)."""
        return seq.pack_segments(per_image, separator, self.cfg.images_per_sequence,
                                 self.layout_index)

    def by_cluster(self, x: Tensor) -> Tensor:
        """(B*K, N, X) raster -> (B*K, G, c^2, X) cluster-priority order."""
        return x[:, self.order].reshape(x.shape[0], self.cfg.clusters_per_image,
                                        self.cfg.tokens_per_segment, -1)

    def separator_tokens(self) -> Optional[Tensor]:
        """(c^2, D): pixel separators through the patch embedding, token-space separators as
        they are, or the learned embedding."""
        if not self.cfg.has_separator:
            return None
        if self.sep_embed is not None:
            return self.sep_embed.weight.expand(self.cfg.tokens_per_segment, -1)
        if self.sep_tokens is not None:
            return self.sep_tokens
        return self.encoder.embed_patches(self.sep_pixels)

    def check_images(self, images: Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(images.shape)} do not match the config: "
                             f"expected (B*K, {', '.join(map(str, expected))}) with "
                             f"in_chans={cfg.in_chans}, img_size={cfg.img_size}")
        if images.shape[0] % cfg.images_per_sequence:
            raise ValueError(f"invalid batch: {images.shape[0]} images are not divisible by "
                             f"images_per_sequence={cfg.images_per_sequence}")

    def forward_encoder(self, images: Tensor) -> list[Tensor]:
        """(B*K, C, H, W) -> the tapped encoder features, n x (B, (T-1)*c^2, D)."""
        tokens = self.by_cluster(self.encoder.embed(images))  # (B*K, G, c^2, D)
        packed = self.pack(tokens, self.separator_tokens())  # (B, T, c^2, D)
        x = packed[:, :-1].flatten(1, 2)  # (B, (T-1)*c^2, D): the last segment is only a target
        final, taps = self.encoder.forward_blocks(x, taps=self.cfg.taps)
        return [final if t == self.cfg.depth else f for t, f in zip(self.cfg.taps, taps)]

    def decoder_mask(self):
        """The decoder's block-causal mask: the (L, L) boolean buffer for SDPA, or, under
        ``attention='flex'`` on CUDA, its FlexAttention block mask (built once per device;
        elsewhere SDPA runs, as FlexAttention has no CPU backward)."""
        if self.cfg.attention != "flex" or self.mask.device.type != "cuda":
            return self.mask
        cached = getattr(self, "_block_mask", None)
        if cached is None or cached[0] != self.mask.device:
            self._block_mask = (self.mask.device, flex_block_mask(self.mask))
        return self._block_mask[1]

    def forward_decoder(self, taps: Sequence[Tensor]) -> Tensor:
        """n x (B, (T-1)*c^2, D) -> pred (B, T-1, c^2, p*p*C)."""
        cfg = self.cfg
        table = (self.dec_pos if self.sep_query_pos is None
                 else torch.cat([self.dec_pos, self.sep_query_pos.to(self.dec_pos.dtype)]))
        query_pos = table[self.query_index].unsqueeze(0)  # (1, (T-1)*c^2, Dd)
        pred = self.decoder(taps, query_pos, self.decoder_mask())  # (B, (T-1)*c^2, P)
        return pred.reshape(pred.shape[0], cfg.num_segments - 1, cfg.tokens_per_segment, -1)

    def target_pixels(self, images: Tensor) -> Tensor:
        """(B*K, C, H, W) -> raw pixels of segments 1..T-1, (B, T-1, c^2, p*p*C) (separators are
        their pixel patterns, in either ``separator_space``; ``embedding`` separators are zeros)."""
        patches = self.by_cluster(seq.patchify(images, self.cfg.patch_size))  # (B*K, G, c^2, P)
        return self.pack(patches, self.sep_pixels)[:, 1:]

    def forward_target(self, images: Tensor) -> Tensor:
        """(B*K, C, H, W) -> targets of segments 1..T-1, (B, T-1, c^2, p*p*C), normalised per
        patch when ``norm_target``."""
        target = self.target_pixels(images)
        return seq.normalize_patches(target) if self.cfg.norm_target else target

    @staticmethod
    def patch_loss(pred: Tensor, target: Tensor) -> Tensor:
        """(B, T-1, c^2, P) twice -> (B, T-1, c^2) float32: each patch's mean squared error."""
        return (pred.float() - target.float()).pow(2).mean(dim=-1)

    def forward_loss(self, patch_loss: Tensor) -> Tensor:
        """(B, T-1, c^2) per-patch MSE -> its mean over the patches of the counted segments."""
        w = self.loss_weight[None, :, None]
        return (patch_loss * w).sum() / (w.sum() * patch_loss.shape[0] * patch_loss.shape[2])

    def forward(self, images: Tensor) -> PretrainOutput:
        self.check_images(images)
        pred = self.forward_decoder(self.forward_encoder(images))
        target = self.forward_target(images)
        patch_loss = self.patch_loss(pred, target)
        return PretrainOutput(self.forward_loss(patch_loss), pred, target, self.loss_weight,
                              patch_loss)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every encoder and decoder block in the backward instead of keeping its
        activations (timm's surface; ``run.grad_checkpointing``); gradients are unchanged."""
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return names | {"decoder.query_token", "sep_query_pos", "sep_embed.weight"}
