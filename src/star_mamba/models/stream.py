"""Streaming inference: a pretrained (causal) STAR encoder over an unbounded stream of images.

The pretraining encoder reads K images packed into one sequence, each laid out as its
separator and cluster segments (``sequence.segment_layout``). Because every mixer is causal and
recurrent, the same features can be computed one token at a time carrying each block's conv
window and SSM state: a stream of images (video frames, a camera) then costs constant memory,
whatever its length, and image k is encoded in the context of images 0..k-1, exactly as in the
packed parallel forward (tests/test_stream.py checks the equality).

    stream = StarStream(model, batch_size=1)
    for frame in frames:                       # (1, C, H, W) each
        out = stream.push(frame)
        out.tokens                             # (1, S*c^2, D) this image's tokens, sequence order
        out.patches                            # (1, N, D) its patch features in raster order
    stream.reset()                             # start a new sequence
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import sequence as seq
from .pretrain import StarPretrain


@dataclass
class StreamOutput:
    tokens: Tensor  # (B, S*c^2, D) final-normed features of the tokens this image added
    patches: Tensor  # (B, N, D) the image's own patch tokens, raster order (separators left out)


class StarStream:
    """Feeds images one at a time through a 1-direction STAR encoder, carrying its state."""

    def __init__(self, model: StarPretrain, batch_size: int = 1, device=None,
                 dtype: Optional[torch.dtype] = None):
        if not isinstance(model, StarPretrain):
            raise TypeError(f"StarStream needs a StarPretrain model, got {type(model).__name__}")
        if model.cfg.directions != 1:
            raise ValueError("streaming needs a causal encoder (directions=1); this one has "
                             f"directions={model.cfg.directions}")
        self.model = model
        self.batch_size = batch_size
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = dtype or param.dtype
        cfg = model.cfg
        c2 = cfg.tokens_per_segment
        # token t of an image's segment run holds cluster-order position cluster_pos[t], or -1
        # for a separator token
        cluster_pos = [g * c2 + i if g < cfg.clusters_per_image else -1
                       for g in model.layout for i in range(c2)]
        keep = torch.tensor([t for t, p in enumerate(cluster_pos) if p >= 0])
        by_cluster = torch.tensor([p for p in cluster_pos if p >= 0])  # (N,) cluster positions
        # keep[j] is the j-th image token in sequence order; it holds cluster position
        # by_cluster[j], i.e. raster patch order[by_cluster[j]]
        raster_of = model.order.cpu()[by_cluster]  # (N,) raster index of each kept token
        self._gather = keep[seq.inverse_order(raster_of)].to(self.device)  # raster -> token
        self.reset()

    def reset(self) -> None:
        """Forget the context: the next image starts a new sequence."""
        self.states = self.model.encoder.allocate_state(self.batch_size, self.device, self.dtype)
        self.images_seen = 0

    def state_bytes(self) -> int:
        """Memory held between images (constant over the stream)."""
        return sum(t.numel() * t.element_size() for s in self.states for t in (s.conv, s.ssm))

    @torch.no_grad()
    def push(self, images: Tensor) -> StreamOutput:
        """Encode the next image of every stream in the batch: (B, C, H, W)."""
        model = self.model
        cfg = model.cfg
        expected = (self.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
        if tuple(images.shape) != expected:
            raise ValueError(f"images of shape {tuple(images.shape)} do not match the stream: "
                             f"expected {expected} (batch_size, in_chans, img_size, img_size)")
        images = images.to(self.device, self.dtype)
        tokens = model.by_cluster(model.encoder.embed(images))  # (B, G, c^2, D)
        segments = seq.pack_segments(tokens, model.separator_tokens(), 1, model.layout)
        x = segments.flatten(1, 2)  # (B, S*c^2, D) this image's tokens in sequence order
        out = torch.stack([model.encoder.step(x[:, t], self.states) for t in range(x.shape[1])],
                          dim=1)  # (B, S*c^2, D)
        self.images_seen += 1
        return StreamOutput(tokens=out, patches=out[:, self._gather])
