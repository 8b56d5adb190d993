"""Per-row adapters on a ``BoneModel`` (one forward, row i uses adapter ``names[i]`` or ``"__base__"``):
``forward`` / ``generate`` with ``adapter_names=[...]``, and the reusable ``routing`` block. The per-layer
mechanics (gathering blocks, plans) are :mod:`bone.routing`'s; this checks the names and opens the context.

- ``model(input_ids, adapter_names=[...])`` / ``model.generate(..., adapter_names=[...])``: one call; each
  layer gathers its per-row blocks on the first forward of the call (generate reuses them for every token).
- ``with model.routing(names) as routed: routed(...); routed(...)``: a serving loop that calls the model
  step by step itself (a KV cache, continuous batching). ``routed`` forwards to the wrapped model (also
  ``routed.generate``) with the rows' adapters, and every call reuses the per-layer plans of the first one —
  the gather happens once per batch composition, not once per token. Open a new ``routing`` when rows join
  or leave. The plans are dropped when the block ends, and automatically whenever an adapter is added to,
  deleted from, merged into or moved with a layer (the next call rebuilds them), so they never go stale.

:class:`RowRoutingMixin` is one of ``BoneModel``'s bases; it uses the host's ``base_model``,
``adapter_configs``, ``_disabled`` and ``bone_layers()``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from .errors import BoneError
from .routing import BASE_ADAPTER, RoutedModel, RowRouting, routing_context

if TYPE_CHECKING:
    from .model_host import BoneModelHost
else:
    BoneModelHost = object


class RowRoutingMixin(BoneModelHost):
    """``forward`` / ``generate`` / ``routing`` with per-row ``adapter_names`` for ``BoneModel``."""

    def _row_names(self, adapter_names: Any, kwargs: dict) -> list[str]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise BoneError("adapter_names must be a list with one adapter name (or '__base__') per row")
        names = list(adapter_names)
        for n in names:
            if n != BASE_ADAPTER and n not in self.adapter_configs:
                raise BoneError(f"unknown adapter {n!r} in adapter_names; adapters: {sorted(self.adapter_configs)}")
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if torch.is_tensor(ref) and ref.dim() >= 1 and ref.shape[0] != len(names):
            raise BoneError(f"adapter_names has {len(names)} entries for a batch of {ref.shape[0]} rows")
        if self._disabled:
            raise BoneError("adapter_names cannot be used inside disable_adapter()")
        if any(layer.merged_adapters for _, layer in self.bone_layers()):
            raise BoneError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        return names

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        if args and "input_ids" not in kwargs and torch.is_tensor(args[0]):
            kwargs["input_ids"], args = args[0], args[1:]
        names = self._row_names(adapter_names, kwargs)
        with routing_context(names):
            return self.base_model(*args, **kwargs)

    @contextmanager
    def routing(self, adapter_names: list[str]):
        """Per-row adapter selection reusable across calls: yields a :class:`~bone.routing.RoutedModel`;
        ``routed(**kwargs)`` runs the wrapped model with row i on ``adapter_names[i]`` (``"__base__"``: the
        base model), reusing the per-layer plans (gathered blocks) built by its first call. Names are
        checked once, here; the batch of every call must have ``len(adapter_names)`` rows (or a multiple:
        rows expanded in place, e.g. beams)."""
        names = self._row_names(adapter_names, {})
        routed = RoutedModel(self.base_model, RowRouting(names))
        try:
            yield routed
        finally:
            routed.close()

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        if args and "input_ids" not in kwargs and torch.is_tensor(args[0]):
            kwargs["input_ids"], args = args[0], args[1:]
        names = self._row_names(adapter_names, kwargs)
        with routing_context(names):  # per-layer gathered blocks are built on the first step, then reused
            return self.base_model.generate(*args, **kwargs)
