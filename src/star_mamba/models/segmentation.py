"""Semantic segmentation over the STAR backbone: a simple feature pyramid and UPerNet, or a
linear per-patch probe.

``StarSegmenter`` = ``StarClassifier`` (no head, any image size that is a multiple of the patch)
-> feature taps of chosen blocks -> ``SimpleFeaturePyramid`` (ViTDet: each tap resampled to one
scale of a pyramid) -> ``UPerHead`` (mmsegmentation's UPerNet decoder: a pyramid pooling module
on the coarsest level, a top-down FPN, every level fused at the finest) and an auxiliary
``FCNHead`` on one level; or ``LinearHead``, a 1x1 classifier on the final-normed patch tokens
(the linear segmentation probe: the caller freezes the backbone). Logits are upsampled bilinear
to the input size.

The pieces follow the published designs (ViTDet's simple feature pyramid; mmsegmentation's
``UPerHead``, ``PPM`` and ``FCNHead``) without depending on mmcv, mmseg or detectron2.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import StarConfig, field_types, typed_values
from ..errors import ConfigError
from .classifier import StarClassifier

HEADS = ("upernet", "linear")
NORMS = ("gn", "bn")
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)
"""The resampling factors ``SimpleFeaturePyramid`` builds (ViTDet's strides 4, 8, 16, 32 for a
16 px patch)."""
CLS_STD = 0.01  # the 1x1 classifiers' normal init (mmseg's conv_seg)
IGNORE_INDEX = 255  # the label of pixels that count in no loss and no metric (ADE20K, VOC)


def _bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"invalid config: segment.{name}={value!r}; {allowed}")


@dataclass
class SegmenterConfig:
    """The segmentation head's options (the backbone's are the ``StarConfig``).

    ``taps`` are 0-based backbone blocks, shallow to deep; None = ``len(pyramid)`` blocks evenly
    spaced ending at the last (depth 12 -> (2, 5, 8, 11), depth 4 -> (0, 1, 2, 3)).
    ``pyramid`` gives each tap's resampling factor, fine to coarse (ViTDet: 4, 2, 1, 0.5).
    ``aux_tap`` indexes ``taps`` (so the pyramid's levels) for the auxiliary FCN head; None =
    the second-to-last level, mmseg's convention for UPerNet (``in_index=2`` of four features:
    C4 of a ResNet, the 1x level of BEiT's and Swin's pyramids). ``aux_weight`` 0 = no
    auxiliary head. ``linear_norm`` adds a LayerNorm before the linear probe's classifier.

    ``norm``: GroupNorm (default) or BatchNorm after every head conv. GroupNorm's statistics are
    per image, so the result does not depend on the batch: 1 and 2 processes compute the same
    function, a batch of 1 or 2 crops on CPU trains, and no SyncBatchNorm is needed (mmseg's
    recipes use SyncBN over 8+ GPUs x 2 images; with ``bn`` under DDP convert the model with
    ``nn.SyncBatchNorm.convert_sync_batchnorm``). ``gn_groups`` is the group count, or the
    largest count below it that divides a layer's channels.
    """

    head: Literal["upernet", "linear"] = "upernet"
    taps: Optional[tuple[int, ...]] = None
    pyramid: tuple[float, ...] = PYRAMID_SCALES
    channels: int = 128  # UPerNet width (mmseg: 512 for ResNet/ViT-B, 768 for BEiT/Swin recipes)
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)  # PPM bins on the coarsest level
    aux_weight: float = 0.4
    aux_tap: Optional[int] = None
    aux_channels: int = 64  # mmseg: 256
    aux_convs: int = 1  # 3x3 conv+norm+ReLU layers in the auxiliary head (mmseg: 1)
    dropout: float = 0.1  # Dropout2d before every 1x1 classifier
    norm: Literal["gn", "bn"] = "gn"
    gn_groups: int = 8
    linear_norm: bool = False
    align_corners: bool = False  # of every bilinear resize (mmseg: False)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise _bad("head", self.head, f"allowed: {', '.join(HEADS)}")
        if self.norm not in NORMS:
            raise _bad("norm", self.norm, f"allowed: {', '.join(NORMS)}")
        if not self.pyramid or any(s not in PYRAMID_SCALES for s in self.pyramid):
            raise _bad("pyramid", self.pyramid, f"one or more of {PYRAMID_SCALES}, one per tap")
        if any(a <= b for a, b in zip(self.pyramid, self.pyramid[1:])):
            raise _bad("pyramid", self.pyramid, "scales must decrease (fine to coarse levels)")
        if self.taps is not None:
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.taps):
                raise _bad("taps", self.taps, "expected 0-based block indices (ints >= 0)")
            if any(a >= b for a, b in zip(self.taps, self.taps[1:])):
                raise _bad("taps", self.taps, "blocks must increase (shallow to deep)")
            if len(self.taps) != len(self.pyramid):
                raise _bad("pyramid", self.pyramid,
                           f"needs one scale per tap ({len(self.taps)} taps: {self.taps})")
        for name in ("channels", "aux_channels", "gn_groups", "aux_convs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _bad(name, value, "expected a positive int")
        if not self.pool_scales or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0
                                       for s in self.pool_scales):
            raise _bad("pool_scales", self.pool_scales, "expected positive ints")
        if not (math.isfinite(self.aux_weight) and self.aux_weight >= 0):
            raise _bad("aux_weight", self.aux_weight, "expected a number >= 0 (0: no auxiliary head)")
        if self.aux_tap is not None and not 0 <= self.aux_tap < len(self.pyramid):
            raise _bad("aux_tap", self.aux_tap,
                       f"indexes the taps / pyramid levels: 0 to {len(self.pyramid) - 1}")
        if not 0.0 <= self.dropout < 1.0:
            raise _bad("dropout", self.dropout, "expected a value in [0, 1)")

    # ---------------------------------------------------------------- derived
    def resolved_taps(self, depth: int) -> tuple[int, ...]:
        """The 0-based blocks tapped in a backbone of ``depth`` blocks (checked against it)."""
        n = len(self.pyramid)
        if self.taps is None:
            if depth < n:
                raise _bad("taps", None, f"a backbone of depth {depth} has fewer blocks than the "
                           f"{n} pyramid levels; give the taps")
            return tuple(depth * (i + 1) // n - 1 for i in range(n))
        if self.taps[-1] >= depth:
            raise _bad("taps", self.taps, f"block indices are 0 to {depth - 1} (depth {depth})")
        return self.taps

    @property
    def resolved_aux_tap(self) -> int:
        """The pyramid level the auxiliary head reads."""
        return self.aux_tap if self.aux_tap is not None else max(len(self.pyramid) - 2, 0)

    @property
    def has_aux(self) -> bool:
        return self.head == "upernet" and self.aux_weight > 0

    # ---------------------------------------------------------------- round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as a checkpoint or YAML file keeps them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SegmenterConfig":
        """From :meth:`to_dict` or a YAML section: unknown keys fail with a hint, values are
        converted to the field types (lists -> tuples)."""
        return cls(**typed_values(values, field_types(cls), "segmenter"))


# ------------------------------------------------------------------------------ building blocks

def norm_layer(kind: str, channels: int, gn_groups: int) -> nn.Module:
    """GroupNorm (``gn_groups`` groups, or the largest count below it that divides
    ``channels``) or BatchNorm2d over (B, channels, H, W)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    groups = max(g for g in range(1, min(gn_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias: the norm has one) -> norm -> activation; 'same' padding."""

    def __init__(self, cin: int, cout: int, kernel: int, cfg: SegmenterConfig,
                 act: Optional[type[nn.Module]] = nn.ReLU):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
                         norm_layer(cfg.norm, cout, cfg.gn_groups),
                         act() if act is not None else nn.Identity())


class Classifier(nn.Sequential):
    """Dropout2d -> 1x1 conv to the classes: (B, C, H, W) -> (B, K, H, W)."""

    def __init__(self, cin: int, num_classes: int, dropout: float):
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(cin, num_classes, 1))


def resize(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    """Bilinear resize of (B, C, h, w) to (B, C, *size); no-op at that size already."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one plain-backbone map per level, resampled by a scale.

    4x: two stride-2 ConvTranspose2d (D -> D/2 -> D/4) with norm + GELU between; 2x: one
    (D -> D/2); 1x: as is; 0.5x: MaxPool2d(2). Each level then has a 1x1 conv to ``channels`` +
    norm and a 3x3 conv + norm. Input: taps [(B, D, h, w)] (one per scale); output:
    [(B, channels, h*s, w*s)] (0.5x floors an odd side).
    """

    def __init__(self, dim: int, cfg: SegmenterConfig):
        super().__init__()
        self.scales = tuple(cfg.pyramid)
        self.resample = nn.ModuleList(self._resample(dim, s, cfg) for s in self.scales)
        widths = {4.0: dim // 4, 2.0: dim // 2, 1.0: dim, 0.5: dim}
        self.out = nn.ModuleList(
            nn.Sequential(ConvNormAct(widths[s], cfg.channels, 1, cfg, act=None),
                          ConvNormAct(cfg.channels, cfg.channels, 3, cfg, act=None))
            for s in self.scales)

    @staticmethod
    def _resample(dim: int, scale: float, cfg: SegmenterConfig) -> nn.Module:
        if scale == 4.0:
            return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                                 norm_layer(cfg.norm, dim // 2, cfg.gn_groups), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2))
        if scale == 2.0:
            return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        if scale == 1.0:
            return nn.Identity()
        return nn.MaxPool2d(2)  # 0.5

    def forward(self, taps: Sequence[Tensor]) -> list[Tensor]:
        if len(taps) != len(self.scales):
            raise ValueError(f"{len(taps)} feature maps for {len(self.scales)} pyramid levels")
        return [out(resample(x)) for x, resample, out in zip(taps, self.resample, self.out)]


class PPM(nn.Module):
    """Pyramid pooling: average-pool (B, C, h, w) to each s x s bin grid, 1x1 conv+norm+ReLU,
    upsample back; concatenated with the input and fused by a 3x3 conv -> (B, channels, h, w)."""

    def __init__(self, cin: int, cfg: SegmenterConfig):
        super().__init__()
        self.align_corners = cfg.align_corners
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(cin, cfg.channels, 1, cfg))
            for s in cfg.pool_scales)
        self.bottleneck = ConvNormAct(cin + len(cfg.pool_scales) * cfg.channels, cfg.channels, 3, cfg)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [resize(stage(x), x.shape[-2:], self.align_corners) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UPerHead(nn.Module):
    """UPerNet's decoder over pyramid levels [(B, C, h_i, w_i)], fine to coarse.

    The PPM on the coarsest level and 1x1 lateral convs on the others; a top-down pass adds each
    coarser level (upsampled) into the next finer; 3x3 convs on all but the coarsest; every
    level upsampled to the finest, concatenated, fused by a 3x3 conv; dropout and a 1x1
    classifier -> (B, K, h_0, w_0).
    """

    def __init__(self, cin: int, num_levels: int, num_classes: int, cfg: SegmenterConfig):
        super().__init__()
        c = cfg.channels
        self.align_corners = cfg.align_corners
        self.ppm = PPM(cin, cfg)
        self.lateral = nn.ModuleList(ConvNormAct(cin, c, 1, cfg) for _ in range(num_levels - 1))
        self.fpn = nn.ModuleList(ConvNormAct(c, c, 3, cfg) for _ in range(num_levels - 1))
        self.fuse = ConvNormAct(num_levels * c, c, 3, cfg)
        self.classifier = Classifier(c, num_classes, cfg.dropout)

    def forward(self, levels: Sequence[Tensor]) -> Tensor:
        lat = [conv(x) for conv, x in zip(self.lateral, levels)] + [self.ppm(levels[-1])]
        for i in range(len(lat) - 1, 0, -1):  # top-down: coarse into fine
            lat[i - 1] = lat[i - 1] + resize(lat[i], lat[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn, lat)] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([resize(x, size, self.align_corners) for x in outs], dim=1))
        return self.classifier(fused)  # (B, K, h_0, w_0)


class FCNHead(nn.Module):
    """The auxiliary head: ``aux_convs`` 3x3 conv+norm+ReLU on one level, dropout, 1x1
    classifier: (B, C, h, w) -> (B, K, h, w)."""

    def __init__(self, cin: int, num_classes: int, cfg: SegmenterConfig):
        super().__init__()
        widths = [cin] + [cfg.aux_channels] * cfg.aux_convs
        self.convs = nn.Sequential(*(ConvNormAct(a, b, 3, cfg) for a, b in zip(widths, widths[1:])))
        self.classifier = Classifier(cfg.aux_channels, num_classes, cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.convs(x))


class LinearHead(nn.Module):
    """The linear segmentation probe: (optional LayerNorm over D) -> dropout -> 1x1 conv, on
    final-normed patch tokens (B, D, h, w) -> (B, K, h, w). No BatchNorm: a frozen backbone's
    probe then gives the same result for any batch and number of processes."""

    def __init__(self, dim: int, num_classes: int, cfg: SegmenterConfig):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if cfg.linear_norm else nn.Identity()
        self.classifier = Classifier(dim, num_classes, cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over D
        return self.classifier(x)


def init_dense_(module: nn.Module) -> None:
    """Head init as mmseg's: convs kaiming-normal (fan_out, ReLU) with zero bias, the 1x1
    classifiers normal std ``CLS_STD`` with zero bias, norms weight 1 / bias 0. Transposed convs
    keep PyTorch's default (as ViTDet)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, Classifier):
            nn.init.normal_(m[1].weight, std=CLS_STD)
            nn.init.zeros_(m[1].bias)


# ------------------------------------------------------------------------------ the model

class StarSegmenter(nn.Module):
    """STAR backbone + simple feature pyramid + UPerNet (or the linear probe): (B, C, H, W)
    images -> (B, K, H, W) logits.

    H and W must be multiples of the patch size (any such size runs: the backbone interpolates
    its positions; ``evaluation.segmentation.predict`` pads other sizes). ``self.backbone`` is a
    ``StarClassifier`` without a head, so ``models.convert.load_pretrained(segmenter.backbone,
    path)`` loads a pretraining or classifier checkpoint into it.

    UPerNet reads raw block outputs; a tap at the last block passes through the backbone's
    final norm (its output, and the norm is trained). Blocks after the deepest tap are not run:
    with such taps DDP needs ``find_unused_parameters``.
    """

    def __init__(self, model_cfg: StarConfig, num_classes: int,
                 seg_cfg: Optional[SegmenterConfig] = None):
        super().__init__()
        seg_cfg = seg_cfg if seg_cfg is not None else SegmenterConfig()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"invalid num_classes={num_classes!r}; expected a positive int")
        self.backbone = StarClassifier(model_cfg.replace(num_classes=0, dynamic_img_size=True))
        self._num_classes = num_classes
        self._seg_cfg = seg_cfg
        dim, depth = model_cfg.embed_dim, model_cfg.depth
        if seg_cfg.head == "linear":
            self.taps: tuple[int, ...] = (depth - 1,)
            self.linear_head = LinearHead(dim, num_classes, seg_cfg)
        else:
            self.taps = seg_cfg.resolved_taps(depth)
            self.pyramid = SimpleFeaturePyramid(dim, seg_cfg)
            self.decode_head = UPerHead(seg_cfg.channels, len(self.taps), num_classes, seg_cfg)
            self.aux_head = FCNHead(seg_cfg.channels, num_classes, seg_cfg) if seg_cfg.has_aux else None
        for part in self.head_modules():
            init_dense_(part)

    # ---------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def cfg(self) -> StarConfig:
        """The backbone's config (``num_classes=0``, ``dynamic_img_size=True``)."""
        return self.backbone.cfg

    @property
    def seg_cfg(self) -> SegmenterConfig:
        return self._seg_cfg

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    def config_dict(self) -> dict[str, Any]:
        """What rebuilds this model (:meth:`from_config_dict`): plain values for a checkpoint."""
        return dict(model=self.cfg.to_dict(), num_classes=self.num_classes,
                    segmenter=self.seg_cfg.to_dict())

    @classmethod
    def from_config_dict(cls, values: Mapping[str, Any]) -> "StarSegmenter":
        return cls(StarConfig.from_dict(values["model"]), int(values["num_classes"]),
                   SegmenterConfig.from_dict(values["segmenter"]))

    # ---------------------------------------------------------------- forward
    def _features(self, images: Tensor) -> list[Tensor]:
        """Backbone taps [(B, D, H/p, W/p)], the last-block tap final-normed."""
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the "
                             f"patch size {p}; pad it (evaluation.segmentation.predict does)")
        taps = self.backbone.forward_intermediates(
            images, indices=list(self.taps), output_fmt="NCHW", intermediates_only=True,
            stop_early=True)
        if self.taps[-1] == self.cfg.depth - 1:
            norm = self.backbone.backbone.norm
            taps[-1] = norm(taps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # over D
        return taps

    def _heads(self, images: Tensor, with_aux: bool) -> tuple[Tensor, Optional[Tensor]]:
        """Logits at the heads' resolution: main (B, K, h0, w0), aux (B, K, h, w) or None."""
        taps = self._features(images)
        if self.seg_cfg.head == "linear":
            return self.linear_head(taps[-1]), None
        levels = self.pyramid(taps)
        aux = (self.aux_head(levels[self.seg_cfg.resolved_aux_tap])
               if with_aux and self.aux_head is not None else None)
        return self.decode_head(levels), aux

    def _upsample(self, logits: Tensor, images: Tensor) -> Tensor:
        return resize(logits, images.shape[-2:], self.seg_cfg.align_corners)

    def forward(self, images: Tensor, with_aux: bool = False):
        """(B, C, H, W), H and W multiples of the patch -> logits (B, K, H, W); with
        ``with_aux`` the training form, :meth:`forward_train`'s pair (the trainer calls the
        model, which DDP may wrap, rather than a method of it)."""
        if with_aux:
            return self.forward_train(images)
        logits, _ = self._heads(images, with_aux=False)
        return self._upsample(logits, images)

    def forward_train(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(B, C, H, W) -> (logits (B, K, H, W), auxiliary logits (B, K, H, W) or None)."""
        logits, aux = self._heads(images, with_aux=True)
        return self._upsample(logits, images), (self._upsample(aux, images) if aux is not None else None)

    # ---------------------------------------------------------------- parameters
    def head_modules(self) -> list[nn.Module]:
        """Everything outside the backbone (pyramid and heads)."""
        return [m for name, m in self.named_children() if name != "backbone" and m is not None]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.head_modules():
            yield from module.parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """The backbone's groups (stem, one per block, final norm) under ``backbone.``; the
        pyramid and heads match nothing, which timm puts in the last group (layer decay: lr
        scale 1)."""
        def prefixed(spec):
            if isinstance(spec, str):  # '^a|^b' alternatives
                return spec.replace("^", r"^backbone\.")
            return [(prefixed(pattern), suffix) for pattern, suffix in spec]
        return {name: prefixed(spec) for name, spec in self.backbone.group_matcher(coarse).items()}


# ------------------------------------------------------------------------------ loss

def segmentation_loss(logits: Tensor, aux_logits: Optional[Tensor], masks: Tensor,
                      aux_weight: float, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel cross-entropy summed over the pixels whose label is not ``ignore_index`` and
    divided by all pixels of the batch (mmseg's default, ``avg_non_ignore=False``), plus
    ``aux_weight`` x the same on the auxiliary logits (if any). logits (B, K, H, W), masks
    (B, H, W) int64.

    Dividing by the batch's pixels rather than its valid ones keeps the loss a mean over a
    fixed count: under DDP each rank's loss then weighs its pixels as one process's would, so
    N processes train the weights one process trains with the same global batch (a mean over
    each rank's valid pixels would weigh ranks with more padding more). A batch with no valid
    pixel gives 0."""
    count = masks.numel()

    def mean_ce(x: Tensor) -> Tensor:
        return F.cross_entropy(x.float(), masks, ignore_index=ignore_index, reduction="sum") / count

    loss = mean_ce(logits)
    if aux_logits is not None and aux_weight:
        loss = loss + aux_weight * mean_ce(aux_logits)
    return loss
