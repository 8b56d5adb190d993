"""Folding a ``BoneModel``'s adapters into the base weights and taking the Bone modules back out:
``merge_adapter`` / ``unmerge_adapter``, ``merge_and_unload`` and ``unload`` (both return the plain HF model).

:class:`AdapterMergeMixin` is one of ``BoneModel``'s bases; it uses the host's ``base_model``,
``adapter_configs``, ``active_adapters``, ``bone_layers()``, ``_mts_wrappers()`` and ``_check_names()``.
``_set_submodule`` (swap one module in the tree) lives here because unwrapping is its main use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .errors import BoneError
from .layer import BoneLinear

if TYPE_CHECKING:
    from .model_host import BoneModelHost
else:
    BoneModelHost = object


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


class AdapterMergeMixin(BoneModelHost):
    """Merge / unmerge / unload for ``BoneModel``."""

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters into the base weights (in order). With ``safe_merge`` every new weight is checked
        for NaN/inf before it is written, and a failure rolls back the layers already merged by this call."""
        names = self._check_names(self.active_adapters if adapter_names is None else adapter_names)
        done: list[tuple[BoneLinear, int]] = []
        try:
            for _, layer in self.bone_layers():
                done.append((layer, len(layer.merge(names, safe_merge=safe_merge))))
        except BoneError:
            for layer, k in reversed(done):
                layer.unmerge(k)
            raise

    def unmerge_adapter(self) -> None:
        for _, layer in self.bone_layers():
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the (active) adapters and return the plain HF model (no Bone modules left)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        names = set(self.active_adapters if adapter_names is None else adapter_names)
        for path, w in self._mts_wrappers():
            keep = next((n for n in (adapter_names or self.active_adapters) if n in w.modules_to_save), None)
            _set_submodule(self.base_model, path, w.modules_to_save[keep] if keep else w.original_module)
        del names
        return self._unwrap_all()

    def unload(self) -> nn.Module:
        """Drop every adapter without merging; returns the plain HF model."""
        self.unmerge_adapter()
        for path, w in self._mts_wrappers():
            _set_submodule(self.base_model, path, w.original_module)
        return self._unwrap_all()

    def _unwrap_all(self) -> nn.Module:
        for path, layer in self.bone_layers():
            _set_submodule(self.base_model, path, layer.base_layer)
        for path, w in self._mts_wrappers():
            _set_submodule(self.base_model, path, w.original_module)
        self.adapter_configs.clear()
        self.active_adapters = []
        return self.base_model
