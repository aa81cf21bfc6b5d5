"""Register the STAR classifiers with timm, so ``timm.create_model("star_base_patch16_224")``
works after ``import star_mamba``, built by timm's own model builder (``build_model_with_cfg``)
like timm's models: each name carries a ``pretrained_cfg`` (input size, crop, normalisation,
classes, stem and head names) that ``timm.data.resolve_data_config`` reads. No pretrained
weights are downloadable (``pretrained=True`` raises). ``features_only=True`` (with
``out_indices``, ``output_fmt``) returns timm's feature getter over
:meth:`StarClassifier.forward_intermediates`: a list of (B, D, H/16, W/16) maps, with the blocks
after the last tap pruned. Only timm's public API is used.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .classifier import StarClassifier
from .registry import MODEL_SIZES, create_model

PATCH, IMG_SIZE = 16, 224


def _cfg(size: str) -> dict[str, Any]:
    """The fine-tuning recipe's data settings (ARM: 224 px, crop 0.875, bicubic, ImageNet
    statistics) and where the stem and the head are. ``fixed_input_size`` as timm's ViT: the
    model takes its config's size unless built with ``dynamic_img_size=True``."""
    return dict(url="", num_classes=1000, input_size=(3, IMG_SIZE, IMG_SIZE), pool_size=None,
                fixed_input_size=True,
                crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv="backbone.patch_embed.proj",
                classifier="head", paper_ids="arXiv:2603.03806",
                description=f"STAR {size} classifier (Vision Mamba), {PATCH} px patches")


default_cfgs = generate_default_cfgs(  # read by register_model from this module
    {f"{size}_patch{PATCH}_{IMG_SIZE}": _cfg(size) for size in MODEL_SIZES})


def _entrypoint(size: str):
    variant = f"{size}_patch{PATCH}_{IMG_SIZE}"

    def create(pretrained: bool = False, **kwargs: Any) -> StarClassifier:
        if pretrained:
            raise ValueError(f"no pretrained weights are published for {size}; load a checkpoint "
                             "with star_mamba.models.convert.load_pretrained instead")
        # taps via forward_intermediates; by default the last 4 blocks
        feature_cfg = dict(feature_cls="getter", out_indices=4)
        if "output_fmt" in kwargs:
            feature_cfg["output_fmt"] = kwargs.pop("output_fmt")
        builder = partial(create_model, size, patch_size=PATCH, img_size=IMG_SIZE)
        return build_model_with_cfg(builder, variant, pretrained=False, feature_cfg=feature_cfg,
                                    **kwargs)
    create.__name__ = variant
    create.__doc__ = f"STAR {size} classifier, {PATCH} px patches, {IMG_SIZE} px (star_mamba.create_model)."
    return create


TIMM_NAMES = []
for _size in MODEL_SIZES:
    _fn = _entrypoint(_size)
    register_model(_fn)
    TIMM_NAMES.append(_fn.__name__)
