"""Model sizes and the two factories: ``create_model`` (classifier) and ``create_pretrain_model``."""
from __future__ import annotations

import difflib
from typing import Any

from ..config import StarConfig
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

# Pretraining defaults (STAR-B recipe) and fine-tuning defaults (ARM recipe).
PRETRAIN_DEFAULTS: dict[str, Any] = dict(img_size=192, directions=1)
CLASSIFIER_DEFAULTS: dict[str, Any] = dict(img_size=224, directions=4, num_classes=1000,
                                           learnable_pos_embed=True)


def list_models() -> list[str]:
    return list(MODEL_SIZES)


def model_config(name: str, defaults: dict[str, Any], **overrides: Any) -> StarConfig:
    """The config of size ``name`` with task ``defaults`` then user ``overrides`` applied."""
    if name not in MODEL_SIZES:
        close = difflib.get_close_matches(name, MODEL_SIZES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint} (available: {', '.join(MODEL_SIZES)})")
    return StarConfig.from_dict({**MODEL_SIZES[name], **defaults, **overrides})


def create_model(name: str, **overrides: Any) -> StarClassifier:
    """Classifier of size ``name`` (4 directions, 224 px, 1000 classes unless overridden)."""
    return StarClassifier(model_config(name, CLASSIFIER_DEFAULTS, **overrides))


def create_pretrain_model(name: str, **overrides: Any) -> StarPretrain:
    """STAR pretraining model of size ``name`` (192 px, K=4, identity separators, SC by default)."""
    return StarPretrain(model_config(name, PRETRAIN_DEFAULTS, **overrides))
