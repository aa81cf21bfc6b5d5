"""Object detection and instance segmentation over the STAR backbone (ViTDet's recipe on
torchvision's Mask R-CNN / Faster R-CNN).

``StarDetectionBackbone`` = ``StarClassifier`` (no head, any size that is a multiple of the
patch) -> one tap (ViTDet: the last block, final-normed) or several -> the segmenter's
``SimpleFeaturePyramid`` (levels at ``patch / scale`` strides: 4, 8, 16, 32 px for a 16 px patch)
-> an extra stride-2 max-pooled ``pool`` level (torchvision's ``LastLevelMaxPool``), returned as
an ``OrderedDict`` ``{"0": ..., "1": ..., "2": ..., "3": ..., "pool": ...}`` with
``out_channels`` = ``fpn_channels``, what torchvision's ``GeneralizedRCNN`` expects.

``build_detector`` wires it into torchvision's ``MaskRCNN`` / ``FasterRCNN`` (subclassed only
to add timm's ``group_matcher`` / ``no_weight_decay``: ``timm.optim.create_optimizer_v2(model,
layer_decay=...)`` then decays the backbone's blocks layer by layer, ViTDet's layer-wise lr
decay, and leaves the pyramid and the heads at lr scale 1). Anchors get one size per level (8 x
its stride, times ``anchor_scale``), RoI pooling reads the four pyramid levels (not ``pool``),
as torchvision's FPN models do.

Images: the model takes a list of (C, H, W) float tensors in [0, 1], **unnormalised**: the
model's transform normalises with ``image_mean`` / ``image_std`` (None: Fashion-MNIST's for 1
channel, ImageNet's for 3) and pads the batch to a multiple of ``size_divisible`` (None: the
coarsest level's stride, so every level divides evenly and any input size runs). With
``min_size`` / ``max_size`` None (default) the model does **not** resize: the data transforms
(``data.detection``) set the size, as ViTDet's large-scale jitter does; given, torchvision's
shorter-side resize applies.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from ..config import StarConfig, field_types, typed_values
from ..errors import ConfigError
from .classifier import StarClassifier
from .segmentation import PYRAMID_SCALES, SegmenterConfig, SimpleFeaturePyramid, init_dense_

KINDS = ("mask_rcnn", "faster_rcnn")
NORMS = ("gn", "bn")
LEVEL_NAMES = ("0", "1", "2", "3")  # the pyramid's levels, fine to coarse (RoI pooling reads them)
POOL_LEVEL = "pool"  # the extra max-pooled level (the RPN's coarsest)
ANCHOR_PER_STRIDE = 8  # torchvision's FPN anchors: 32 px at stride 4 ... 512 px at stride 64
ASPECT_RATIOS = (0.5, 1.0, 2.0)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _bad(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"invalid config: detect.{name}={value!r}; {allowed}")


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


@dataclass
class DetectorConfig:
    """The detector's options (the backbone's are the ``StarConfig``).

    ``taps``: 0-based blocks; None = the last block only, fed to every pyramid level (ViTDet's
    single-scale design); else one tap per ``pyramid`` scale, shallow to deep. ``pyramid``:
    the resampling factors of the simple feature pyramid (4, 2, 1, 0.5: strides p/4 ... 2p),
    ``fpn_channels`` its width (torchvision's heads: 256; smaller for CPU), ``norm`` /
    ``gn_groups`` its norm (GroupNorm is per image, independent of the batch).

    ``min_size`` / ``max_size``: torchvision's shorter / longer side resize inside the model;
    None (both) = keep the size the data gives. ``size_divisible``: pad the batch to a
    multiple of this (None: the pool level's stride, 4 x patch for the default pyramid).
    ``image_mean`` / ``image_std``: the model normalises [0, 1] images with these; None =
    Fashion-MNIST's (1 channel) or ImageNet's (3 channels). Pass mean 0 / std 1 for data that
    is normalised already.

    ``anchor_sizes``: one tuple of sizes per RPN level (5 levels: the pyramid's + pool); None =
    ``ANCHOR_PER_STRIDE`` x each level's stride x ``anchor_scale`` (a 16 px patch: 32 ... 512,
    torchvision's FPN anchors). The ``rpn_*``, ``box_*`` counts are torchvision's defaults.
    """

    kind: Literal["mask_rcnn", "faster_rcnn"] = "mask_rcnn"
    taps: Optional[tuple[int, ...]] = None
    pyramid: tuple[float, ...] = PYRAMID_SCALES
    fpn_channels: int = 256
    norm: Literal["gn", "bn"] = "gn"
    gn_groups: int = 32
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    size_divisible: Optional[int] = None
    image_mean: Optional[tuple[float, ...]] = None
    image_std: Optional[tuple[float, ...]] = None
    anchor_sizes: Optional[tuple[tuple[int, ...], ...]] = None
    anchor_scale: float = 1.0
    aspect_ratios: tuple[float, ...] = ASPECT_RATIOS
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise _bad("kind", self.kind, f"allowed: {', '.join(KINDS)}")
        if self.norm not in NORMS:
            raise _bad("norm", self.norm, f"allowed: {', '.join(NORMS)}")
        if len(self.pyramid) != len(LEVEL_NAMES) or any(s not in PYRAMID_SCALES for s in self.pyramid) \
                or any(a <= b for a, b in zip(self.pyramid, self.pyramid[1:])):
            raise _bad("pyramid", self.pyramid,
                       f"expected {len(LEVEL_NAMES)} decreasing scales from {PYRAMID_SCALES}")
        if self.taps is not None:
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.taps):
                raise _bad("taps", self.taps, "expected 0-based block indices (ints >= 0)")
            if any(a >= b for a, b in zip(self.taps, self.taps[1:])):
                raise _bad("taps", self.taps, "blocks must increase (shallow to deep)")
            if len(self.taps) not in (1, len(self.pyramid)):
                raise _bad("taps", self.taps, f"expected 1 tap or one per pyramid level "
                           f"({len(self.pyramid)}); null = the last block")
        for name in ("fpn_channels", "gn_groups", "rpn_pre_nms_top_n_train",
                     "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train",
                     "rpn_post_nms_top_n_test", "rpn_batch_size_per_image",
                     "box_batch_size_per_image", "box_detections_per_img"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _bad(name, value, "expected a positive int")
        for name in ("min_size", "max_size", "size_divisible"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise _bad(name, value, "expected a positive int or null")
        if (self.min_size is None) != (self.max_size is None):
            raise _bad("min_size", self.min_size, "give min_size and max_size together, or "
                       "neither (null: keep the data's size)")
        if self.min_size is not None and self.max_size < self.min_size:
            raise _bad("max_size", self.max_size, f"expected >= min_size={self.min_size}")
        if (self.image_mean is None) != (self.image_std is None):
            raise _bad("image_mean", self.image_mean, "give image_mean and image_std together")
        if self.image_mean is not None:
            if len(self.image_mean) != len(self.image_std) or not self.image_mean:
                raise _bad("image_std", self.image_std, "expected one value per image_mean channel")
            if any(not s > 0 for s in self.image_std):
                raise _bad("image_std", self.image_std, "expected positive values")
        if self.anchor_sizes is not None:
            if len(self.anchor_sizes) != len(LEVEL_NAMES) + 1 or any(
                    not sizes or any(not s > 0 for s in sizes) for sizes in self.anchor_sizes):
                raise _bad("anchor_sizes", self.anchor_sizes,
                           f"expected {len(LEVEL_NAMES) + 1} lists of positive sizes (one per "
                           "RPN level: the pyramid's and pool)")
        if not (math.isfinite(self.anchor_scale) and self.anchor_scale > 0):
            raise _bad("anchor_scale", self.anchor_scale, "expected a positive number")
        if not self.aspect_ratios or any(not r > 0 for r in self.aspect_ratios):
            raise _bad("aspect_ratios", self.aspect_ratios, "expected positive ratios")
        for name in ("rpn_nms_thresh", "box_score_thresh", "box_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise _bad(name, getattr(self, name), "expected a value in [0, 1]")

    # ---------------------------------------------------------------- derived
    def resolved_taps(self, depth: int) -> tuple[int, ...]:
        """The 0-based blocks tapped in a backbone of ``depth`` blocks (checked against it)."""
        taps = self.taps if self.taps is not None else (depth - 1,)
        if taps[-1] >= depth:
            raise _bad("taps", self.taps, f"block indices are 0 to {depth - 1} (depth {depth})")
        return taps

    def strides(self, patch_size: int) -> tuple[int, ...]:
        """The five RPN levels' strides in pixels: the pyramid's, then pool's (twice the last)."""
        strides = [patch_size / s for s in self.pyramid]
        if any(s != int(s) or s < 1 for s in strides):
            raise _bad("pyramid", self.pyramid, f"patch_size {patch_size} / scale must be a "
                       "whole number of pixels at every level")
        strides = [int(s) for s in strides]
        return (*strides, strides[-1] * 2)

    def resolved_size_divisible(self, patch_size: int) -> int:
        value = self.size_divisible if self.size_divisible is not None else self.strides(patch_size)[-1]
        if value % patch_size:
            raise _bad("size_divisible", value, f"expected a multiple of the patch size {patch_size}")
        return value

    def resolved_anchor_sizes(self, patch_size: int) -> tuple[tuple[int, ...], ...]:
        if self.anchor_sizes is not None:
            return tuple(tuple(s) for s in self.anchor_sizes)
        return tuple((max(1, round(ANCHOR_PER_STRIDE * s * self.anchor_scale)),)
                     for s in self.strides(patch_size))

    def resolved_normalisation(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self.image_mean is not None:
            if len(self.image_mean) != channels:
                raise _bad("image_mean", self.image_mean, f"expected {channels} values "
                           f"(model.in_chans={channels})")
            return tuple(self.image_mean), tuple(self.image_std)
        if channels == 3:
            return IMAGENET_MEAN, IMAGENET_STD
        raise _bad("image_mean", None, f"give image_mean and image_std for {channels} channel(s) "
                   "(the detect task fills them from the dataset's statistics)")

    # ---------------------------------------------------------------- round trip
    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as a checkpoint or YAML file keeps them."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DetectorConfig":
        return cls(**typed_values(values, field_types(cls), "detect"))


# ------------------------------------------------------------------------------ the backbone

class StarDetectionBackbone(nn.Module):
    """STAR backbone -> simple feature pyramid -> ``OrderedDict`` of five (B, C, h_i, w_i) maps
    named ``"0"`` ... ``"3"`` (strides p/4 ... 2p for the default pyramid) and ``"pool"`` (a
    stride-2 subsampling of ``"3"``), ``C = out_channels``.

    ``self.body`` is a ``StarClassifier`` without a head (``dynamic_img_size``), so
    ``models.convert.load_pretrained(detector.backbone.body, path)`` loads STAR pretraining or
    classifier weights. A last-block tap passes through the backbone's final norm (as the
    segmenter's). Blocks after the deepest tap are not run.
    """

    def __init__(self, model_cfg: StarConfig, det_cfg: DetectorConfig):
        super().__init__()
        self.body = StarClassifier(model_cfg.replace(num_classes=0, dynamic_img_size=True))
        self.taps = det_cfg.resolved_taps(model_cfg.depth)
        self.patch_size = model_cfg.patch_size
        self.strides = det_cfg.strides(model_cfg.patch_size)
        self.out_channels = det_cfg.fpn_channels
        self.pyramid = SimpleFeaturePyramid(model_cfg.embed_dim, SegmenterConfig(
            pyramid=det_cfg.pyramid, channels=det_cfg.fpn_channels, norm=det_cfg.norm,
            gn_groups=det_cfg.gn_groups))
        init_dense_(self.pyramid)

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the "
                             f"patch size {p}; the detector's transform pads to size_divisible")
        taps = self.body.forward_intermediates(images, indices=list(self.taps), output_fmt="NCHW",
                                               intermediates_only=True, stop_early=True)
        if self.taps[-1] == self.body.cfg.depth - 1:
            norm = self.body.backbone.norm
            taps[-1] = norm(taps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # over D
        if len(taps) == 1:
            taps = taps * len(LEVEL_NAMES)  # ViTDet: every level from the last block
        levels = self.pyramid(taps)
        out = OrderedDict(zip(LEVEL_NAMES, levels))
        out[POOL_LEVEL] = F.max_pool2d(levels[-1], kernel_size=1, stride=2)  # LastLevelMaxPool
        return out


# ------------------------------------------------------------------------------ the detectors

class KeepSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, batch with padding) without its resize: the data
    transforms set the size. Predictions then come back in the input's coordinates."""

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None):
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(Normalize(mean={self.image_mean}, std={self.image_std}), "
                f"no resize, pad to a multiple of {self.size_divisible})")


class _StarDetectorMixin:
    """timm's optimizer surface on torchvision's detectors: layer-wise lr decay over the
    backbone's blocks (stem, one group per block, final norm); the pyramid, RPN and RoI heads
    match no group, which timm puts at lr scale 1."""

    backbone: StarDetectionBackbone

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"backbone.body.{n}" for n in self.backbone.body.no_weight_decay()}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        def prefixed(spec):
            if isinstance(spec, str):  # '^a|^b' alternatives
                return spec.replace("^", r"^backbone\.body\.")
            return [(prefixed(pattern), suffix) for pattern, suffix in spec]
        return {name: prefixed(spec) for name, spec in self.backbone.body.group_matcher(coarse).items()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.body.set_grad_checkpointing(enable)


class StarMaskRCNN(_StarDetectorMixin, MaskRCNN):
    """torchvision's ``MaskRCNN`` over :class:`StarDetectionBackbone`."""


class StarFasterRCNN(_StarDetectorMixin, FasterRCNN):
    """torchvision's ``FasterRCNN`` over :class:`StarDetectionBackbone`."""


def build_detector(model_cfg: StarConfig, num_classes: int,
                   det_cfg: Optional[DetectorConfig] = None) -> FasterRCNN:
    """A torchvision Mask R-CNN (``det_cfg.kind``, default) or Faster R-CNN over the STAR
    backbone, for ``num_classes`` object classes (background not counted: labels 1..K).

    Training: ``model(images, targets)`` -> torchvision's loss dict; eval: ``model(images)`` ->
    per image ``{"boxes", "labels", "scores"(, "masks" (N, 1, H, W) probabilities)}`` in the
    input's coordinates. ``model.backbone.body`` is the ``StarClassifier`` for
    ``load_pretrained``; drop path comes from ``model_cfg.drop_path_rate``."""
    det_cfg = det_cfg if det_cfg is not None else DetectorConfig()
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"invalid num_classes={num_classes!r}; expected a positive int "
                          "(object classes, background not counted)")
    p = model_cfg.patch_size
    backbone = StarDetectionBackbone(model_cfg, det_cfg)
    anchors = AnchorGenerator(det_cfg.resolved_anchor_sizes(p),
                              (tuple(det_cfg.aspect_ratios),) * (len(LEVEL_NAMES) + 1))
    mean, std = det_cfg.resolved_normalisation(model_cfg.in_chans)
    divisible = det_cfg.resolved_size_divisible(p)
    kwargs = dict(
        num_classes=num_classes + 1, rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(list(LEVEL_NAMES), output_size=7, sampling_ratio=2),
        min_size=det_cfg.min_size or 800, max_size=det_cfg.max_size or 1333,
        image_mean=list(mean), image_std=list(std), size_divisible=divisible,
        rpn_pre_nms_top_n_train=det_cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=det_cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=det_cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=det_cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=det_cfg.rpn_nms_thresh,
        rpn_batch_size_per_image=det_cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=det_cfg.box_batch_size_per_image,
        box_score_thresh=det_cfg.box_score_thresh, box_nms_thresh=det_cfg.box_nms_thresh,
        box_detections_per_img=det_cfg.box_detections_per_img)
    if det_cfg.kind == "mask_rcnn":
        model = StarMaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(
            list(LEVEL_NAMES), output_size=14, sampling_ratio=2), **kwargs)
    else:
        model = StarFasterRCNN(backbone, **kwargs)
    if det_cfg.min_size is None:
        model.transform = KeepSizeTransform(800, 1333, list(mean), list(std),
                                            size_divisible=divisible)
    model.det_cfg = det_cfg
    model.model_cfg = model.backbone.body.cfg
    model.num_object_classes = num_classes
    return model


def detector_config_dict(model: FasterRCNN) -> dict[str, Any]:
    """What rebuilds a :func:`build_detector` model (:func:`detector_from_config_dict`)."""
    return dict(model=model.model_cfg.to_dict(), num_classes=model.num_object_classes,
                detector=model.det_cfg.to_dict())


def detector_from_config_dict(values: Mapping[str, Any]) -> FasterRCNN:
    return build_detector(StarConfig.from_dict(values["model"]), int(values["num_classes"]),
                          DetectorConfig.from_dict(values["detector"]))


def detector_param_groups(model: nn.Module, lr: float, weight_decay: float,
                          layer_decay: Optional[float] = None) -> list[dict]:
    """AdamW parameter groups: with ``layer_decay``, timm's layer-wise decay over the backbone
    blocks (``lr_scale`` per group; the pyramid and heads at 1), else one decayed and one
    undecayed group; 1-D parameters and ``no_weight_decay()`` names get no weight decay. Each
    group carries ``lr`` = ``lr * lr_scale``."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay, skip, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay, skip)
    for group in groups:
        group.setdefault("lr_scale", 1.0)
        group["lr"] = lr * group["lr_scale"]
    return groups


__all__ = ["DetectorConfig", "KeepSizeTransform", "StarDetectionBackbone", "StarFasterRCNN",
           "StarMaskRCNN", "build_detector", "detector_config_dict", "detector_from_config_dict",
           "detector_param_groups"]
