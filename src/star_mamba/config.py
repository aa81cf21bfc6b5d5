"""One validated configuration object for every STAR model.

Every number the model uses (image size, patch, cluster, images per sequence, separator kind and
position, decoder width and taps, ...) lives here. Derived quantities (grid sizes, sequence
lengths, tapped layers) are properties, so they can never disagree with the fields they come from.
An impossible configuration raises :class:`~star_mamba.errors.ConfigError` (a ``ValueError``)
naming the field, the value and what is allowed.

Where model defaults live: the field defaults below, then the size's ``embed_dim`` and ``depth``
(``models.registry.MODEL_SIZES``), then the run's YAML file and ``--set`` (``configs/``). The
Python factory ``create_model`` adds ARM's fine-tuning recipe (``CLASSIFIER_DEFAULTS``).

:func:`typed_values` is the one place where config values are checked and converted: the fields
of ``StarConfig`` here and every section of a run config (``engine/config.py``) go through it.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .errors import ConfigError

SEPARATORS = ("identity", "zeros", "ones", "embedding", "none")
"""Separator kinds. ``none`` packs images back to back with no separator (ARM when K = 1)."""

SEPARATOR_SPACES = ("pixel", "token")
"""Where a zeros / ones / identity separator is written: as pixel patches through the patch
embedding (``pixel``) or directly as D-dimensional token vectors (``token``); an ``embedding``
separator is a learned token whichever is set."""

SEPARATOR_POSITIONS = ("SC", "CS", "SCS", "CSC")
"""Separator layouts: S = separator cluster, C = image cluster(s); see ``star_mamba.sequence``."""

CLASS_TOKEN_POSITIONS = ("none", "middle", "end")
GLOBAL_POOLS = ("avg", "cls", "")
"""Classifier pooling: the mean of the patch tokens, the class token, or none (timm's ``''``:
the head then reads every token)."""
DIRECTIONS = (1, 2, 4)
INIT_SCHEMES = ("arm", "trunc_normal")
"""Weight initialisation schemes (``star_mamba.models.init``)."""
ATTENTION_KERNELS = ("sdpa", "flex")
"""The pretraining decoder's attention: SDPA with a boolean mask, or FlexAttention (CUDA)."""

DEFAULT_MAX_TOKENS = 2 ** 16
"""Default ``model.max_tokens``, the most tokens one sequence may hold (an image's patches; in
pretraining the packed sequence of K images). 65,536 is 100 x the paper's STAR-B sequence (640
tokens) and a 4096 px image in 16 px patches; the position table and every layer's activations
grow with it, to tens of GB for one STAR-B sequence at this length, so a size past it is far more
likely a typo than a plan. Raise ``model.max_tokens`` to go beyond."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid config: model.{name}={value!r}; {allowed}")


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
    img_size: Union[int, tuple[int, int]] = 192  # an (h, w) pair, as timm passes it, must be square: kept as h
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
    norm_eps: float = 1e-5  # ARM's LayerNorm eps (PyTorch's default)
    # weight init scheme (models/init.py): 'arm' (ARM's code) or 'trunc_normal' (timm ViT style);
    # it only decides fresh weights, so a checkpoint resumes under either
    init: str = field(default="arm", metadata={"runtime": True})
    directions: int = 1  # 1 causal (pretraining); 2 forward + reverse; 4 also over the transposed grid
    # how the scan runs, not what the model is: a checkpoint resumes under another backend
    scan_backend: str = field(default="auto", metadata={"runtime": True})
    # fused memory-bound ops (ops/swiglu.py: the SwiGLU MLP as one projection, its product
    # recomputed in the backward): the same outputs and parameters, fewer saved activations
    fused_ops: bool = field(default=False, metadata={"runtime": True})
    # the pretraining decoder's attention kernel: sdpa (everywhere) or flex (FlexAttention with
    # a block mask built once per layout, on CUDA; elsewhere SDPA, as flex has no CPU backward)
    attention: str = field(default="sdpa", metadata={"runtime": True})
    # the most tokens one sequence may hold: a guard against absurd sizes, not part of the model
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"runtime": True})
    # -- STAR sequence (pretraining)
    cluster_size: int = 4  # c: a cluster is c x c adjacent patches
    images_per_sequence: int = 4  # K
    separator: str = "identity"
    separator_position: str = "SC"
    separator_space: str = "pixel"  # 'pixel' (through the patch embedding) or 'token'
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
    final_norm: bool = True  # False after prune_intermediate_layers(prune_norm=True)
    # the classifier takes any image size that is a multiple of the patch (timm's ViT option):
    # positions interpolated from the table, scan orders built for the image's grid
    dynamic_img_size: bool = field(default=False, metadata={"runtime": True})

    def __post_init__(self) -> None:
        if isinstance(self.img_size, (tuple, list)):
            if len(self.img_size) != 2 or self.img_size[0] != self.img_size[1]:
                _fail("img_size", tuple(self.img_size),
                      "only square images: give one size or an (h, w) pair with h == w")
            self.img_size = self.img_size[0]
        if self.decoder_taps is not None:
            self.decoder_taps = tuple(self.decoder_taps)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "d_state",
                     "d_conv", "expand", "cluster_size", "images_per_sequence", "decoder_dim",
                     "decoder_depth", "decoder_heads", "max_tokens"):
            _positive(name, getattr(self, name))
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
                or self.num_classes < 0:
            _fail("num_classes", self.num_classes, "expected an integer >= 0 (0: no head)")
        if self.dt_rank is not None:
            _positive("dt_rank", self.dt_rank)
        for name in ("mlp_ratio", "decoder_mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "expected a positive number")
        if not 0.0 <= self.drop_path_rate < 1.0:
            _fail("drop_path_rate", self.drop_path_rate, "expected a value in [0, 1)")
        _choice("directions", self.directions, DIRECTIONS)
        _choice("init", self.init, INIT_SCHEMES)
        _choice("attention", self.attention, ATTENTION_KERNELS)
        _choice("separator", self.separator, SEPARATORS)
        _choice("separator_position", self.separator_position, SEPARATOR_POSITIONS)
        _choice("separator_space", self.separator_space, SEPARATOR_SPACES)
        if self.separator_space == "token" and self.separator == "none":
            _fail("separator_space", self.separator_space,
                  "separator='none' has no separator to place in token space; use 'pixel'")
        _choice("class_token", self.class_token, CLASS_TOKEN_POSITIONS)
        _choice("global_pool", self.global_pool, GLOBAL_POOLS)
        if self.global_pool == "cls" and self.class_token == "none":
            _fail("global_pool", self.global_pool, "'cls' pooling needs class_token 'middle' or 'end'")
        if self.img_size % self.patch_size:
            _fail("img_size", self.img_size,
                  f"must be divisible by patch_size={self.patch_size}")
        self._check_tokens("img_size", self.img_size, self.num_patches,
                           f"{self.grid_size} x {self.grid_size} patches of {self.patch_size} px",
                           "a smaller img_size or a larger patch_size")
        if self.embed_dim % 4:
            _fail("embed_dim", self.embed_dim, "must be divisible by 4 (2D sin-cos positions)")

    def _check_tokens(self, name: str, value: Any, tokens: int, what: str, instead: str) -> None:
        if tokens > self.max_tokens:
            _fail(name, value, f"that makes {tokens} tokens per sequence ({what}), more than "
                  f"model.max_tokens={self.max_tokens} (the position table and activations grow "
                  f"with it); use {instead}, or raise model.max_tokens")

    def validate_pretraining(self) -> None:
        """Checks of the fields only pretraining uses (clusters, packing, decoder)."""
        if self.directions != 1:
            _fail("directions", self.directions,
                  "pretraining is autoregressive and needs a causal backbone (directions=1)")
        if self.dynamic_img_size:
            _fail("dynamic_img_size", self.dynamic_img_size,
                  "pretraining packs clusters of a fixed grid; only the classifier takes other sizes")
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
        self._check_tokens("images_per_sequence", self.images_per_sequence, self.seq_len,
                           f"{self.images_per_sequence} images x {self.segments_per_image} "
                           f"segments x {self.tokens_per_segment} tokens",
                           "fewer images per sequence or larger patches")
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
        """A copy with some fields changed, typed and checked like :meth:`from_dict`."""
        return dataclasses.replace(self, **typed_values(overrides, field_types(StarConfig), "model"))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["decoder_taps"] is not None:
            out["decoder_taps"] = list(out["decoder_taps"])
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "StarConfig":
        """From a YAML ``model`` section, a checkpoint's ``model_config`` or a hub config.json:
        unknown names fail with a "did you mean" hint, values are converted to the field types
        ('1e-1' -> 0.1, a list -> a tuple); a field left out keeps its default."""
        return cls(**typed_values(values, field_types(cls), "model"))


RUNTIME_FIELDS = frozenset(f.name for f in dataclasses.fields(StarConfig) if f.metadata.get("runtime"))
"""Fields that say how the model runs, not what it is (the weights do not depend on them)."""

WEIGHT_SHAPE_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "d_state", "d_conv",
                       "expand", "dt_rank", "mlp_ratio")
"""Backbone fields that set the shapes of its weights: where a pretrained backbone does not load
into a model, the ones that differ are named (the image size and the directions are converted,
``models/convert.py``)."""


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(StarConfig))


# ---------------------------------------------------------------------- typed config values

def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's field names and their (resolved) type annotations, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def typed_values(values: Mapping[str, Any], types_: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Check one config section against ``types_`` (name -> annotation) and convert each value.

    Unknown names raise :class:`ConfigError` with a "did you mean" hint; values are converted to
    their annotation (see :func:`coerce`). ``section`` (``model``, ``optim``, ...) names the
    section in the messages. Every config section of the package goes through here.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"invalid config: section {section!r} must be a mapping of key: value, "
                          f"got {values!r}")
    out = {}
    for key, value in values.items():
        if key not in types_:
            hint = did_you_mean(key, types_) or f" (valid keys: {', '.join(types_)})"
            raise ConfigError(f"unknown config key {section}.{key}{hint}")
        out[key] = coerce(value, types_[key], f"{section}.{key}")
    return out


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` converted to ``annotation`` (bool, int, float, str, tuples, Optional, Any), or
    :class:`ConfigError` naming ``name``. Numbers may come as strings (YAML 1.1 reads ``1e-4``
    without a dot as a string); an integral float is an int; lists become tuples."""
    where = f"invalid config: {name}={value!r}"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: a value is required")
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], name)
        for option in options:
            try:
                return coerce(value, option, name)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected one of {', '.join(map(_type_name, options))}")
    if value is None:
        raise ConfigError(f"{where}: a value is required")
    if annotation is Any:
        return value
    if origin is typing.Literal:
        return _choice_value(value, args, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if annotation in (int, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number")
        if annotation is int:
            if not math.isfinite(value) or value != int(value):
                raise ConfigError(f"{where}: expected an integer")
            return int(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number")
        return float(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, e.g. [{', '.join(['1'] * max(len(args), 2))}]"
                              if args and args[-1] is not Ellipsis else f"{where}: expected a list")
        if args and args[-1] is Ellipsis:
            element_types = [args[0]] * len(value)
        else:
            if args and len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values")
            element_types = list(args) or [Any] * len(value)
        return tuple(coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, element_types)))
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        return dict(value)
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/yes/no as booleans
            return "on" if value else "off"
        if isinstance(value, (list, tuple, Mapping)):
            raise ConfigError(f"{where}: expected a single value")
        return str(value)
    return value


def _choice_value(value: Any, allowed: tuple, where: str) -> Any:
    """A ``Literal[...]`` field: ``value`` (as the choices' type) if it is one of ``allowed``."""
    kind = type(allowed[0])
    try:
        value = coerce(value, kind, where.partition("=")[0].removeprefix("invalid config: "))
    except ConfigError:
        pass
    if value in allowed and type(value) is kind:
        return value
    hint = did_you_mean(str(value), [str(a) for a in allowed])
    choices = ", ".join(map(str, allowed))
    raise ConfigError(f"{where}{hint} (allowed: {choices})" if hint else f"{where}; allowed: {choices}")


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)
