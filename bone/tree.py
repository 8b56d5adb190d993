"""Walking and editing the module tree of a wrapped model: where the ``BoneLinear`` layers and the
``ModulesToSave`` wrappers are, and swapping one module for another (wrapping, unwrapping)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .layer import BoneLinear
from .modules_to_save import ModulesToSave


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() that sees a BoneLinear as the layer it wraps and skips adapter internals."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child
            if isinstance(child, (BoneLinear, ModulesToSave)):
                continue
            yield from walk(name, child)

    yield from walk("", model)


def bone_layers(model: nn.Module) -> list[tuple[str, BoneLinear]]:
    return [(n, m) for n, m in iter_modules(model) if isinstance(m, BoneLinear)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSave]]:
    """The ``modules_to_save`` wrappers, with their paths."""
    return [(n, m) for n, m in iter_modules(model) if isinstance(m, ModulesToSave)]


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)
