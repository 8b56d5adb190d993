"""The stacked blocks of adapters that own one row each, kept across the routings of one running batch.

A mixed decode batch where every row is its own adapter multiplies each row's chunk sums with its adapter's
block in ONE ``bmm`` over the blocks stacked ``(n, r, out)`` (``bone.routing.RowPlan.singles``). Stacking is a
copy of those blocks, per layer; built afresh for every batch composition, a serving loop copied every single
adapter's blocks again on every join and leave (64 adapters of Llama-2-7B, all-linear, r=64, bf16: ~11 GB per
join), and again after every chunk of a prompt being prefilled between decode steps.

:class:`BlockStacks` keeps one slab per (layer, r, dtype) for as long as its owner (the serving host's running
batch) lives, and fills it by position: a position whose adapter (the same block parameter, unmodified) is
already there is not copied. The engine's rows join at the end and a leaver's slot is taken by the last row
(``app.engine.kv_store``), so a join copies the newcomers' blocks and a leave the moved row's; only when a slab
runs out of room is it allocated again (in steps of :data:`GROWTH` positions, so at most one full copy per
``GROWTH`` joins).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

GROWTH = 8  # a slab's positions grow in multiples of this: a full re-copy at most once per GROWTH joins

# One position's source: (the block parameter it was copied from, that parameter's in-place version). The
# parameter is held weakly: a deleted adapter's block must not stay alive through a stack.
_Source = tuple[weakref.ref, int]


class _Slab:
    __slots__ = ("data", "sources", "owner")

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.sources: list[_Source | None] = [None] * data.shape[0]
        self.owner: weakref.ref | None = None  # the routing whose plan holds a view of ``data``


class BlockStacks:
    """Slabs of stacked one-row blocks, reused across routings; ``held_bytes``: what they hold."""

    def __init__(self) -> None:
        self._slabs: dict[tuple[Any, int, torch.dtype], _Slab] = {}
        self.held_bytes = 0
        self.copied_blocks = 0  # blocks written into slabs, a slab's growth included (tests and the bench)

    def stack(
        self,
        layer: Any,
        r: int,
        dtype: torch.dtype,
        params: Sequence[torch.Tensor],
        block_of: Callable[[int], torch.Tensor],
        room: int | None,
        owner: Any,
    ) -> torch.Tensor | None:
        """The blocks of ``params`` stacked in order, ``(len(params), r, out)`` in ``dtype``, as a view of the
        layer's slab; position i is (re)written from ``block_of(i)`` only when it does not already hold
        ``params[i]`` unmodified. ``room``: bytes a new or larger slab may take beyond the current one (None:
        no limit); past it, None (the caller keeps its per-adapter segments).

        ``owner``: the routing whose plan will hold the view. Two routings can be open at once (the running
        batch's and the one of a prompt being prefilled); a slab rewritten for one would corrupt the other's
        view, so the previous owner is told to ``forget(layer)`` its plan (it rebuilds it when it runs next,
        rewriting only the positions that differ)."""
        n = len(params)
        key = (layer, r, dtype)
        slab = self._slabs.get(key)
        if slab is not None:
            self._take(slab, layer, owner)
        device = params[0].device
        if slab is None or slab.data.shape[0] < n or slab.data.device != device:
            first = block_of(0)
            cap = -(-n // GROWTH) * GROWTH
            size = cap * first.numel() * torch.empty((), dtype=dtype).element_size()
            current = 0 if slab is None else slab.data.numel() * slab.data.element_size()
            if room is not None and size - current > room:
                return None
            data = torch.empty((cap, *first.shape), dtype=dtype, device=device)
            fresh = _Slab(data)
            if slab is not None and slab.data.device == device:  # keep what the old slab held
                old = slab.data.shape[0]
                data[:old].copy_(slab.data)
                fresh.sources[:old] = slab.sources
                self.copied_blocks += old
            self.held_bytes += size - current
            self._slabs[key] = slab = fresh
            slab.owner = weakref.ref(owner)
        for i, p in enumerate(params):
            src = slab.sources[i]
            if src is not None and src[0]() is p and src[1] == p._version:
                continue
            slab.data[i].copy_(block_of(i))
            slab.sources[i] = (weakref.ref(p), p._version)
            self.copied_blocks += 1
        return slab.data[:n]

    @staticmethod
    def _live_owner(slab: _Slab) -> Any:
        """The routing whose open plan reads the slab, or None (none did yet, or it was closed / collected)."""
        owner = None if slab.owner is None else slab.owner()
        return None if owner is None or getattr(owner, "closed", False) else owner

    def _take(self, slab: _Slab, layer: Any, owner: Any) -> None:
        previous = self._live_owner(slab)
        if previous is not owner:
            if previous is not None:
                previous.forget(layer)
            slab.owner = weakref.ref(owner)

    def drop(self, layer: Any, r: int, dtype: torch.dtype, owner: Any) -> None:
        """Let a slab go when ``owner``'s plan for the layer stacks no blocks of this r and dtype, unless
        another live routing's plan still reads it."""
        slab = self._slabs.get((layer, r, dtype))
        if slab is None:
            return
        previous = self._live_owner(slab)
        if previous is None or previous is owner:
            del self._slabs[(layer, r, dtype)]
            self.held_bytes -= slab.data.numel() * slab.data.element_size()

    def clear(self) -> None:
        self._slabs.clear()
        self.held_bytes = 0
