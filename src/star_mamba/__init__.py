"""STAR: autoregressive pretraining for Vision Mamba with separators between packed images.

The models (``star_mamba.StarClassifier``, ``create_model`` ...) are imported on first use, so
that ``star-mamba --help`` and the parser of every command load neither torch nor timm. When
torch or timm is already imported (nothing to save), they are imported at once, as they always
were: ``import timm, star_mamba`` registers the ``star_*_patch16_224`` names with timm, and any
use of ``star_mamba.models`` (or of the attributes below) does too.
"""
from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"
_LAZY = {"StarConfig": ".config", "StarBackbone": ".models", "StarClassifier": ".models",
         "StarPretrain": ".models", "MODEL_SIZES": ".models", "StarStream": ".models",
         "create_model": ".models", "create_pretrain_model": ".models", "list_models": ".models"}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if "torch" in sys.modules or "timm" in sys.modules:
    from . import models as _models  # noqa: F401  (registers the timm names)
