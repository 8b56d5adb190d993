"""Folding adapters into the base weights of a wrapped model and taking the Bone modules back out.

Plain functions over the wrapped Hugging Face model (the module tree holding ``BoneLinear`` layers and
``ModulesToSave`` wrappers); ``BoneModel``'s PEFT-style methods (``merge_adapter``, ``merge_and_unload``,
``unload``) call them with the adapter names they checked.
"""

from __future__ import annotations

from torch import nn

from .errors import BoneError
from .layer import BoneLinear
from .tree import bone_layers, saved_modules, set_submodule


def merge(model: nn.Module, names: list[str], safe_merge: bool = False) -> None:
    """Add the adapters ``names`` into the base weights (in order). With ``safe_merge`` every new weight is
    checked for NaN/inf before it is written, and a failure rolls back the layers already merged by this call."""
    done: list[tuple[BoneLinear, int]] = []
    try:
        for _, layer in bone_layers(model):
            done.append((layer, len(layer.merge(names, safe_merge=safe_merge))))
    except BoneError:
        for layer, k in reversed(done):
            layer.unmerge(k)
        raise


def unmerge(model: nn.Module) -> None:
    for _, layer in bone_layers(model):
        layer.unmerge()


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged_adapters for _, layer in bone_layers(model))


def unwrap(model: nn.Module, keep: list[str] | None = None) -> nn.Module:
    """Put the original modules back (merged weights stay merged) and return ``model``. A ``modules_to_save``
    wrapper is replaced by the trained copy of the first adapter of ``keep`` that has one, else its original."""
    for path, wrapper in saved_modules(model):
        name = next((n for n in keep or () if n in wrapper.modules_to_save), None)
        set_submodule(model, path, wrapper.modules_to_save[name] if name else wrapper.original_module)
    for path, layer in bone_layers(model):
        set_submodule(model, path, layer.base_layer)
    return model
