"""Bone / Bat / MiSS adapters for Hugging Face models: PEFT-compatible config and checkpoints, several
adapters per model, per-row adapter selection in one batch. Pure torch + transformers + safetensors."""

from .arithmetic import combine as combine_bone_adapters
from .config import BoneConfig
from .errors import BoneCheckpointError, BoneConfigError, BoneError
from .export import LoraExport, to_lora
from .layer import BoneLinear
from .model import BoneModel, get_bone_model
from .routing import BASE_ADAPTER
from .targets import DEFAULT_TARGETS, validate_config_for_model

__all__ = [
    "BASE_ADAPTER",
    "BoneCheckpointError",
    "BoneConfig",
    "BoneConfigError",
    "BoneError",
    "BoneLinear",
    "BoneModel",
    "DEFAULT_TARGETS",
    "LoraExport",
    "combine_bone_adapters",
    "get_bone_model",
    "to_lora",
    "validate_config_for_model",
]
