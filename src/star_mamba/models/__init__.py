from .backbone import StarBackbone
from .classifier import StarClassifier
from .mamba import Mamba, MambaState
from .pretrain import PretrainOutput, StarDecoder, StarPretrain
from .stream import StarStream, StreamOutput
from .segmentation import SegmenterConfig, StarSegmenter, segmentation_loss
from .detection import DetectorConfig, StarDetectionBackbone, build_detector, detector_param_groups
from .registry import MODEL_SIZES, create_model, create_pretrain_model, list_models, model_config
from . import timm_registry  # registers star_*_patch16_224 with timm
