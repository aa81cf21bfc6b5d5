"""One validated configuration object for every STAR model.

Every number the model uses (image size, patch, cluster, images per sequence, separator kind and
position, decoder width and taps, ...) lives here. Derived quantities (grid sizes, sequence
lengths, tapped layers) are properties, so they can never disagree with the fields they come from.
An impossible configuration raises ``ValueError`` naming the field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

SEPARATORS = ("identity", "zeros", "ones", "embedding", "none")
"""Separator kinds. ``none`` packs images back to back with no separator (ARM when K = 1)."""

SEPARATOR_POSITIONS = ("SC", "CS", "SCS", "CSC")
"""Separator layouts: S = separator cluster, C = image cluster(s); see ``star_mamba.sequence``."""

CLASS_TOKEN_POSITIONS = ("none", "middle", "end")
GLOBAL_POOLS = ("avg", "cls")
DIRECTIONS = (1, 2, 4)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"invalid config: {name}={value!r}; {allowed}")


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        _fail(name, value, f"allowed values are {', '.join(repr(a) for a in allowed)}")


def _positive(name: str, value: Any, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        _fail(name, value, f"expected a positive {kind.__name__}")


@dataclass
class StarConfig:
    """Configuration of a STAR backbone, its pretraining head and its classifier.

    The backbone fields (``embed_dim`` ... ``directions``) are shared by pretraining and
    fine-tuning; the sequence fields only matter for pretraining, the classifier fields only for
    fine-tuning.
    """

    # -- image and tokens
    img_size: int = 192
    patch_size: int = 16
    in_chans: int = 3
    # -- backbone: MambaMLP blocks
    embed_dim: int = 192
    depth: int = 12
    d_state: int = 16
    d_conv: int = 4
    expand: int = 1
    dt_rank: Optional[int] = None  # None -> ceil(embed_dim / 16)
    mlp_ratio: float = 8.0 / 3.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    directions: int = 1  # 1 causal (pretraining); 2 forward + reverse; 4 also over the transposed grid
    scan_backend: str = "auto"
    # -- STAR sequence (pretraining)
    cluster_size: int = 4  # c: a cluster is c x c adjacent patches
    images_per_sequence: int = 4  # K
    separator: str = "identity"
    separator_position: str = "SC"
    separator_loss: bool = True  # do separator targets count in the loss
    norm_target: bool = True  # normalise each target patch by its own mean and variance
    # -- decoder (pretraining)
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 4.0
    decoder_taps: Optional[tuple[int, ...]] = None  # 1-based encoder depths; None -> evenly spaced
    # -- classifier (fine-tuning)
    num_classes: int = 1000
    class_token: str = "end"
    global_pool: str = "avg"
    learnable_pos_embed: bool = False  # fixed sin-cos in pretraining; learnable when fine-tuning

    def __post_init__(self) -> None:
        if self.decoder_taps is not None:
            self.decoder_taps = tuple(self.decoder_taps)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "d_state",
                     "d_conv", "expand", "cluster_size", "images_per_sequence", "decoder_dim",
                     "decoder_depth", "decoder_heads", "num_classes"):
            _positive(name, getattr(self, name))
        if self.dt_rank is not None:
            _positive("dt_rank", self.dt_rank)
        for name in ("mlp_ratio", "decoder_mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "expected a positive number")
        if not 0.0 <= self.drop_path_rate < 1.0:
            _fail("drop_path_rate", self.drop_path_rate, "expected a value in [0, 1)")
        _choice("directions", self.directions, DIRECTIONS)
        _choice("separator", self.separator, SEPARATORS)
        _choice("separator_position", self.separator_position, SEPARATOR_POSITIONS)
        _choice("class_token", self.class_token, CLASS_TOKEN_POSITIONS)
        _choice("global_pool", self.global_pool, GLOBAL_POOLS)
        if self.global_pool == "cls" and self.class_token == "none":
            _fail("global_pool", self.global_pool, "'cls' pooling needs class_token 'middle' or 'end'")
        if self.img_size % self.patch_size:
            _fail("img_size", self.img_size,
                  f"must be divisible by patch_size={self.patch_size}")
        if self.embed_dim % 4:
            _fail("embed_dim", self.embed_dim, "must be divisible by 4 (2D sin-cos positions)")

    def validate_pretraining(self) -> None:
        """Checks of the fields only pretraining uses (clusters, packing, decoder)."""
        if self.directions != 1:
            _fail("directions", self.directions,
                  "pretraining is autoregressive and needs a causal backbone (directions=1)")
        if self.grid_size % self.cluster_size:
            _fail("cluster_size", self.cluster_size,
                  f"must divide the patch grid of {self.grid_size} x {self.grid_size} patches "
                  f"(img_size={self.img_size} / patch_size={self.patch_size}); allowed: "
                  f"{[c for c in range(1, self.grid_size + 1) if self.grid_size % c == 0]}")
        if self.decoder_dim % 4:
            _fail("decoder_dim", self.decoder_dim, "must be divisible by 4 (2D sin-cos positions)")
        if self.decoder_dim % self.decoder_heads:
            _fail("decoder_heads", self.decoder_heads,
                  f"must divide decoder_dim={self.decoder_dim}")
        if self.num_segments < 2:
            _fail("images_per_sequence", self.images_per_sequence,
                  "the packed sequence needs at least two segments to predict one from another "
                  "(use more clusters per image, more images or a separator)")
        if self.decoder_taps is not None:
            if len(self.decoder_taps) != self.decoder_depth:
                _fail("decoder_taps", self.decoder_taps,
                      f"needs one tapped layer per decoder block (decoder_depth={self.decoder_depth})")
            for tap in self.decoder_taps:
                if isinstance(tap, bool) or not isinstance(tap, int) or not 1 <= tap <= self.depth:
                    _fail("decoder_taps", self.decoder_taps,
                          f"each tap is an encoder depth in 1..{self.depth}")
            if max(self.decoder_taps) != self.depth:
                _fail("decoder_taps", self.decoder_taps,
                      f"the deepest tap must be the last encoder block ({self.depth}): blocks "
                      "after it would get no gradient in pretraining (and stall DDP); lower "
                      "model.depth instead")
        if self.separator == "embedding" and self.separator_loss and not self.norm_target:
            _fail("separator_loss", self.separator_loss,
                  "an 'embedding' separator has no pixels to predict without norm_target "
                  "(normalised separator targets are zero); set separator_loss=False")

    # ------------------------------------------------------------------ derived sizes
    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def cluster_grid(self) -> int:
        """Clusters per image side (Gw)."""
        return self.grid_size // self.cluster_size

    @property
    def clusters_per_image(self) -> int:
        """G: clusters per image."""
        return self.cluster_grid ** 2

    @property
    def tokens_per_segment(self) -> int:
        """c^2: tokens in a cluster, and so in a separator."""
        return self.cluster_size ** 2

    @property
    def patch_dim(self) -> int:
        """Values per patch: p * p * C."""
        return self.patch_size ** 2 * self.in_chans

    @property
    def has_separator(self) -> bool:
        return self.separator != "none"

    @property
    def segments_per_image(self) -> int:
        """Segments one image contributes to a packed sequence (its clusters and separators)."""
        g = self.clusters_per_image
        if not self.has_separator:
            return g
        return g + 1 if self.separator_position in ("SC", "CS") else 2 * g

    @property
    def num_segments(self) -> int:
        """T: segments in one packed sequence of K images."""
        return self.images_per_sequence * self.segments_per_image

    @property
    def seq_len(self) -> int:
        """Tokens in a packed sequence (the encoder reads all but the last segment)."""
        return self.num_segments * self.tokens_per_segment

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.embed_dim / 16)

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.embed_dim)

    @property
    def taps(self) -> tuple[int, ...]:
        """1-based encoder depths read by the decoder blocks, evenly spaced over the upper half.

        depth 12, 4 decoder blocks -> (6, 8, 10, 12); depth 24 -> (12, 16, 20, 24).
        """
        if self.decoder_taps is not None:
            return self.decoder_taps
        n, d = self.decoder_depth, self.depth
        if n == 1:
            return (d,)
        return tuple(max(1, round(d / 2 + i * (d / 2) / (n - 1))) for i in range(n))

    # ------------------------------------------------------------------ construction helpers
    def replace(self, **overrides: Any) -> "StarConfig":
        """A copy with some fields changed; unknown names raise ``ValueError`` with a hint."""
        check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["decoder_taps"] is not None:
            out["decoder_taps"] = list(out["decoder_taps"])
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "StarConfig":
        check_fields(values)
        return cls(**values)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(StarConfig))


def check_fields(values: Mapping[str, Any]) -> None:
    """Reject unknown option names with a "did you mean" hint instead of swallowing them."""
    names = field_names()
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config field {key!r}{hint} "
                             f"(valid fields: {', '.join(names)})")
