"""Writing one of a ``BoneModel``'s adapters out: ``get_adapter_state_dict`` (its tensors in PEFT's on-disk
layout), ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``) and ``export_miss``.
The file formats themselves are :mod:`bone.checkpoint`'s business; this is the model-side half.

:class:`AdapterSaveMixin` is one of ``BoneModel``'s bases; it uses the host's ``base_model``,
``adapter_configs``, ``active_adapters``, ``bone_layers()``, ``_mts_wrappers()`` and ``_check_names()``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from . import checkpoint as ckpt
from .errors import BoneError

if TYPE_CHECKING:
    from .model_host import BoneModelHost
else:
    BoneModelHost = object


class AdapterSaveMixin(BoneModelHost):
    """Adapter state dicts and checkpoint directories for ``BoneModel``."""

    def _resolve_one(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise BoneError(f"active adapters are {self.active_adapters}; pass adapter_name to choose one")
            return self.active_adapters[0]
        return self._check_names([adapter_name])[0]

    def get_adapter_state_dict(self, adapter_name: str | None = None, format: str = "bone") -> dict[str, torch.Tensor]:
        """This adapter's tensors in PEFT's on-disk layout (never another adapter's)."""
        name = self._resolve_one(adapter_name)
        config = self.adapter_configs[name]
        sd: dict[str, torch.Tensor] = {}
        targets: set[str] = set()
        for path, layer in self.bone_layers():
            if name in layer.bone_block:
                sd[f"{ckpt.PREFIX}{path}.bone_block"] = layer.bone_block[name].detach().clone()
                targets.add(path)
        for path, w in self._mts_wrappers():
            if name in w.modules_to_save:
                for k, v in w.modules_to_save[name].state_dict().items():
                    sd[f"{ckpt.PREFIX}{path}.{k}"] = v.detach().clone()
        for k, p in ckpt.bias_parameters(self.base_model, config, targets).items():
            sd[f"{ckpt.PREFIX}{k}"] = p.detach().clone()
        return ckpt.to_format(sd, format.lower())

    def save_pretrained(
        self, save_directory: str | os.PathLike, adapter_name: str | None = None, format: str = "bone"
    ) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for one adapter (the active one by
        default). ``format="miss"`` writes the MiSS form that current PEFT loads."""
        name = self._resolve_one(adapter_name)
        fmt = format.lower()
        config = self.adapter_configs[name]
        d = config.to_dict(fmt)  # raises for mini/dropout in the BONE format
        d["inference_mode"] = True
        if d["base_model_name_or_path"] is None:
            d["base_model_name_or_path"] = getattr(self.base_model, "name_or_path", None)
        if d["task_type"] is None:
            cls = type(self.base_model)
            d["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
        ckpt.write_adapter_dir(save_directory, d, self.get_adapter_state_dict(name, format=fmt))

    def export_miss(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        self.save_pretrained(save_directory, adapter_name, format="miss")
