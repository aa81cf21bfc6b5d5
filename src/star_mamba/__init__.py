"""STAR: autoregressive pretraining for Vision Mamba with separators between packed images."""
from .config import StarConfig
from .models import (MODEL_SIZES, StarBackbone, StarClassifier, StarPretrain, create_model,
                     create_pretrain_model, list_models, StarStream)

__version__ = "0.1.0"
__all__ = ["StarConfig", "StarBackbone", "StarClassifier", "StarPretrain", "MODEL_SIZES",
           "StarStream", "create_model", "create_pretrain_model", "list_models",
           "__version__"]
