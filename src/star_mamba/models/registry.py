"""Model sizes and the two factories: ``create_model`` (classifier) and ``create_pretrain_model``.

A model config is StarConfig's field defaults, then the size's ``embed_dim`` and ``depth``
(:data:`MODEL_SIZES`), then the caller's fields (a run's YAML ``model`` section and ``--set``).
``create_model`` alone adds :data:`CLASSIFIER_DEFAULTS` in between.
"""
from __future__ import annotations

from typing import Any

from ..config import StarConfig, did_you_mean
from ..errors import ConfigError
from .classifier import StarClassifier
from .pretrain import StarPretrain

# ARM naming; tiny and small are ours. All: patch 16, expand 1, d_state 16, d_conv 4.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "star_tiny": dict(embed_dim=192, depth=12),
    "star_small": dict(embed_dim=384, depth=12),
    "star_base": dict(embed_dim=768, depth=12),
    "star_large": dict(embed_dim=1024, depth=24),
    "star_huge": dict(embed_dim=1536, depth=24),
}

# The Python factory's classifier (ARM's fine-tuning recipe: 224 px, 4 scan directions, learnable
# positions). StarConfig's own defaults are STAR-B pretraining's (192 px, 1 causal direction).
# Run configs do not use this: the fine-tuning YAML files under configs/ say it themselves.
CLASSIFIER_DEFAULTS: dict[str, Any] = dict(img_size=224, directions=4, num_classes=1000,
                                           learnable_pos_embed=True)


def list_models() -> list[str]:
    return list(MODEL_SIZES)


def model_config(name: str, **fields: Any) -> StarConfig:
    """The config of size ``name`` with ``fields`` (any StarConfig field) applied."""
    if name not in MODEL_SIZES:
        raise ConfigError(f"invalid config: model.name={name!r}{did_you_mean(name, MODEL_SIZES)} "
                          f"(available: {', '.join(MODEL_SIZES)})")
    return StarConfig.from_dict({**MODEL_SIZES[name], **fields})


def create_model(name: str, **overrides: Any) -> StarClassifier:
    """Classifier of size ``name`` (4 directions, 224 px, 1000 classes unless overridden)."""
    return StarClassifier(model_config(name, **{**CLASSIFIER_DEFAULTS, **overrides}))


def create_pretrain_model(name: str, **overrides: Any) -> StarPretrain:
    """STAR pretraining model of size ``name`` (192 px, K=4, identity separators, SC by default)."""
    return StarPretrain(model_config(name, **overrides))
