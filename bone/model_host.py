"""What ``BoneModel``'s mixins (merge, save, row routing) use of their host, declared for the type checker.

Only imported under ``TYPE_CHECKING``: at run time the mixins derive from ``object`` and ``BoneModel``
provides all of this itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from .config import BoneConfig
from .layer import BoneLinear
from .modules_to_save import ModulesToSave


class BoneModelHost(Protocol):
    base_model: Any  # the wrapped transformers model (generate, get_submodule, ...)
    adapter_configs: dict[str, BoneConfig]
    active_adapters: list[str]
    _disabled: bool

    def bone_layers(self) -> list[tuple[str, BoneLinear]]: ...

    def _mts_wrappers(self) -> list[tuple[str, ModulesToSave]]: ...

    def _check_names(self, names: Iterable[str]) -> list[str]: ...
