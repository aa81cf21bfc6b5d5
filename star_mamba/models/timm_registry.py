"""Register the STAR classifiers with timm, so ``timm.create_model("star_base_patch16_224")``
works after ``import star_mamba`` (no pretrained weights are downloadable: ``pretrained=True``
raises). ``features_only=True`` (with ``out_indices``) returns timm's feature getter over
:meth:`StarClassifier.forward_intermediates`: a list of (B, D, H/16, W/16) maps."""
from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models._features import FeatureGetterNet

from .classifier import StarClassifier
from .registry import MODEL_SIZES, create_model

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(size: str):
    def create(pretrained: bool = False, **kwargs: Any) -> StarClassifier:
        if pretrained:
            raise ValueError(f"no pretrained weights are published for {size}; load a checkpoint "
                             "with star_mamba.models.convert.load_pretrained instead")
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        features_only = kwargs.pop("features_only", False)
        out_indices = kwargs.pop("out_indices", 4)
        output_fmt = kwargs.pop("output_fmt", "NCHW")
        kwargs.pop("feature_cls", None)  # one kind here: taps via forward_intermediates
        model = create_model(size, patch_size=16, img_size=kwargs.pop("img_size", 224), **kwargs)
        if not features_only:
            return model
        return FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt)
    create.__name__ = f"{size}_patch16_224"
    create.__doc__ = f"STAR {size} classifier, 16 px patches, 224 px (star_mamba.create_model)."
    return create


TIMM_NAMES = []
for _size in MODEL_SIZES:
    _fn = _entrypoint(_size)
    register_model(_fn)
    TIMM_NAMES.append(_fn.__name__)
