"""ARM checkpoints (OliverRensu/ARM) -> STAR models: ``star-mamba convert-arm``.

One job per module: ``keys`` (the key table and its transforms), ``reading`` (ARM files and
state dicts), ``infer`` (the config, from the shapes), ``convert`` (the conversion and the
file-to-file entry). Design notes -- ARM's layout, the naming, what is transformed and why, the
source commit: ``docs/convert_arm.md``.
"""
from .convert import ArmReport, arm_to_star, build_model, convert_arm_checkpoint, load_converted
from .infer import infer_config
from .keys import TARGETS, TWINS
from .reading import check_arm_state_dict, detect_target, load_arm_file, unwrap_arm_checkpoint

__all__ = ["ArmReport", "TARGETS", "TWINS", "arm_to_star", "build_model", "check_arm_state_dict",
           "convert_arm_checkpoint", "detect_target", "infer_config", "load_arm_file",
           "load_converted", "unwrap_arm_checkpoint"]
