"""``ModulesToSave``: a module trained in full for some adapters (PEFT's ``modules_to_save``).

Holds the original module and one trainable copy per adapter; the active adapter's copy runs (the original
when adapters are disabled or none of the active ones has a copy). In per-row mode rows are grouped per
adapter (a loop over distinct adapters, not rows)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .routing import current_routing


class ModulesToSave(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self._active: str | None = None
        self._disabled = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self._active == name:
            self._active = None

    def set_disabled(self, flag: bool) -> None:
        self._disabled = bool(flag)

    def set_active(self, names: list[str]) -> None:
        self._active = next((n for n in names if n in self.modules_to_save), None)

    def module_for(self, name: str | None) -> nn.Module:
        if name is not None and name in self.modules_to_save:
            return self.modules_to_save[name]
        return self.original_module

    def forward(self, x, *args, **kwargs):
        routing = current_routing()
        if routing is None or not torch.is_tensor(x) or x.dim() == 0:
            mod = self.original_module if self._disabled else self.module_for(self._active)
            return mod(x, *args, **kwargs)
        names = routing.row_names(x.shape[0])
        groups: dict[str | None, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n if n in self.modules_to_save else None, []).append(i)
        if len(groups) == 1:
            return self.module_for(next(iter(groups)))(x, *args, **kwargs)
        out = None
        for group, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            yb = self.module_for(group)(x.index_select(0, idx), *args, **kwargs)
            if out is None:
                out = yb.new_empty((x.shape[0],) + tuple(yb.shape[1:]))
            out = out.index_copy(0, idx, yb)
        return out
