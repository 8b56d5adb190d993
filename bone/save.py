"""Writing one adapter of a wrapped model out: its tensors in PEFT's on-disk layout and its checkpoint directory
(``adapter_config.json`` + ``adapter_model.safetensors``). The file formats themselves are
:mod:`bone.adapter_files`'s business; these are plain functions over the wrapped Hugging Face model, which
``BoneModel.get_adapter_state_dict`` / ``save_pretrained`` call with the adapter's checked name and config."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from . import adapter_files
from .config import BoneConfig
from .tree import bone_layers, saved_modules


def adapter_state_dict(
    model: nn.Module, name: str, config: BoneConfig, format: str = "bone"
) -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors in PEFT's on-disk layout (never another adapter's)."""
    sd: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for path, layer in bone_layers(model):
        if name in layer.bone_block:
            sd[f"{adapter_files.PREFIX}{path}.bone_block"] = layer.bone_block[name].detach().clone()
            targets.add(path)
    for path, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            for k, v in wrapper.modules_to_save[name].state_dict().items():
                sd[f"{adapter_files.PREFIX}{path}.{k}"] = v.detach().clone()
    for k, p in adapter_files.bias_parameters(model, config, targets).items():
        sd[f"{adapter_files.PREFIX}{k}"] = p.detach().clone()
    return adapter_files.to_format(sd, format.lower())


def saved_config(model: nn.Module, config: BoneConfig, format: str = "bone") -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT's ``save_pretrained`` writes for ``config`` on ``model``."""
    d = config.to_dict(format)  # raises for mini/dropout in the BONE format
    d["inference_mode"] = True
    if d["base_model_name_or_path"] is None:
        d["base_model_name_or_path"] = getattr(model, "name_or_path", None)
    if d["task_type"] is None:
        cls = type(model)
        d["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return d


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, name: str, config: BoneConfig, format: str = "bone"
) -> None:
    """Write adapter ``name`` as a checkpoint directory; ``format="miss"`` writes the MiSS form current PEFT loads."""
    fmt = format.lower()
    adapter_files.write_adapter_dir(
        directory, saved_config(model, config, fmt), adapter_state_dict(model, name, config, fmt)
    )
