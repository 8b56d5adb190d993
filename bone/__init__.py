"""Bone / Bat / MiSS adapters for Hugging Face models: PEFT-compatible config and checkpoints, several
adapters per model, per-row adapter selection in one batch. Pure torch + transformers + safetensors.

The config and the errors load eagerly; everything that needs torch loads on first use, so a process that
only validates configs (the API) can ``import bone.config`` without importing torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import BASE_ADAPTER, BoneConfig
from .errors import BoneCheckpointError, BoneConfigError, BoneError

if TYPE_CHECKING:
    from .arithmetic import combine as combine_bone_adapters
    from .export import LoraExport, to_lora
    from .layer import BoneLinear
    from .model import BoneModel, get_bone_model
    from .targets import DEFAULT_TARGETS, validate_config_for_model

# public name -> (module, attribute) for the names that need torch
_LAZY = {
    "BoneLinear": ("layer", "BoneLinear"),
    "BoneModel": ("model", "BoneModel"),
    "DEFAULT_TARGETS": ("targets", "DEFAULT_TARGETS"),
    "LoraExport": ("export", "LoraExport"),
    "combine_bone_adapters": ("arithmetic", "combine"),
    "get_bone_model": ("model", "get_bone_model"),
    "to_lora": ("export", "to_lora"),
    "validate_config_for_model": ("targets", "validate_config_for_model"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bone' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


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
