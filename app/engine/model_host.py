"""The serving model: the base model wrapped once in a ``BoneModel`` with no adapter of its own, so
adapters are added and deleted in place (no reload, no merge) and every batch row picks its adapter by name.

Only the engine's model thread calls into this class.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from bone import BoneConfig, BoneModel
from bone.block_stacks import BlockStacks
from bone.routing import RoutedModel
from core.errors import Conflict


class ModelHost:
    def __init__(self, model: torch.nn.Module) -> None:
        # Adapter blocks are stored in the base's dtype (cast once, when they are added), not in float32 as
        # in training: the fused serving path (``bone.routing.row_forward``) needs x, W and the blocks in one
        # dtype, and a bf16/fp16 base with float32 blocks would take the slow path on every layer.
        self.bone_model = BoneModel(model, autocast_adapter_dtype=False)
        self.dtype = next(model.parameters()).dtype
        self.bone_model.eval()
        # The open routings: the running rows' ("batch") and that of rows being prefilled outside the batch
        # ("side": a prompt entering chunk by chunk between decode steps, newcomers prefilled together), each
        # with the slots it was built for, so alternating between the two never rebuilds a plan; a new
        # composition of either closes only its own. The side routing lingers until the next side forward or
        # the batch's end, so it holds no dense Bat weight and no shared stack (bat budget 0): only index
        # tensors, and on CPU the fp32 copies of its half-precision blocks.
        self._routings: dict[str, tuple[tuple[str, ...], AbstractContextManager[RoutedModel], RoutedModel]] = {}
        # Stacked one-row blocks shared by those routings for the batch's whole life (bone.block_stacks): a
        # join or leave copies only the blocks that moved, not every one-row adapter's blocks again.
        self._stacks = BlockStacks()
        self._layers: list[Any] | None = None  # the Bone layers, found again after adapters are added/deleted
        # Bytes of dense Bat weights a batch may hold between steps (None: no limit); the engine sets it to
        # the adapter pool's free room before each forward, so Bat weights never push the pool past its bound.
        self.bat_budget_bytes: int | None = None
        # told the running batch's ``working_bytes`` whenever it changes (0 when the batch ends)
        self.on_working_bytes: Callable[[int], None] | None = None
        self._reported = 0

    @property
    def working_bytes(self) -> int:
        """What the running batch costs beyond the resident adapters (``bone.routing.RowRouting``, and the
        stacked blocks its routings share)."""
        return sum(routed.working_bytes for _, _, routed in self._routings.values()) + self._stacks.held_bytes

    @property
    def stacked_blocks_copied(self) -> int:
        """Blocks copied into the batch's stacks so far (tests and the bench: a join copies the newcomers')."""
        return self._stacks.copied_blocks

    @property
    def adapter_slots(self) -> list[str]:
        return list(self.bone_model.adapter_configs)

    def add_adapter(self, slot: str, config: BoneConfig, tensors: dict[str, Any]) -> None:
        """Add an adapter read by ``core.adapter_loading.read_adapter`` (which refuses trained biases)."""
        if self.dtype == torch.float16:  # the one cast that can overflow: refuse it here, not as a NaN batch
            limit = torch.finfo(torch.float16).max
            if any(t.is_floating_point() and t.abs().max() > limit for t in tensors.values() if t.numel()):
                raise Conflict(
                    "this adapter has weights beyond float16's range; serve it with BONE_DTYPE=bfloat16 or float32",
                    param="adapter",
                    code="unservable_adapter",
                )
        self._layers = None
        self.bone_model.add_adapter_from_state_dict(slot, config, tensors)  # strict key/shape checks

    def delete_adapter(self, slot: str) -> None:
        if slot in self.bone_model.adapter_configs:
            self._layers = None
            self.bone_model.delete_adapter(slot)

    def forward(self, slots: list[str], side: bool = False, **kwargs: Any) -> Any:
        """One forward where row i uses adapter ``slots[i]`` (or the base); ``side``: rows being prefilled
        outside the running batch (their routing is kept apart from the batch's).

        Consecutive calls with the same rows (the decode steps between two joins/leaves) share one
        ``BoneModel.routing``, so each layer groups its rows by adapter once per batch composition, not once
        per token (a few index tensors; no adapter block is copied per row); base weights and resident
        adapters are never copied or moved. A slot in use by a running row is never
        deleted (``AdapterCache`` in_use); adding or deleting other adapters drops the affected plans, which
        the next step rebuilds.
        """
        if not self.bone_model.adapter_configs:
            return self.bone_model(**kwargs)  # nothing loaded yet: the plain model, no routing overhead
        kind, key = ("side" if side else "batch"), tuple(slots)
        entry = self._routings.get(kind)
        if entry is None or entry[0] != key:
            if entry is not None:
                self._close(kind)
            if side:  # holds nothing past its forward that it need not: no dense Bat weight, no shared stack
                routing = self.bone_model.routing(slots, 0)
            else:
                routing = self.bone_model.routing(slots, self.bat_budget_bytes, self._stacks)
            entry = self._routings[kind] = (key, routing, routing.__enter__())
            fresh = True
        else:
            fresh = self._layers is None  # adapters were added or deleted since: every plan is to be checked
        if fresh and not side:  # every layer's plan built (or checked) in one tight loop, not between matmuls
            ids = kwargs.get("input_ids")
            if self._layers is None:
                self._layers = [layer for _, layer in self.bone_model.bone_layers()]
            entry[2].prepare(self._layers, len(slots), 1 if ids is None else ids.shape[-1])
        out = entry[2](**kwargs)
        self._report(self.working_bytes)
        return out

    def _close(self, kind: str) -> None:
        _, routing, _ = self._routings.pop(kind)
        routing.__exit__(None, None, None)

    def _report(self, working: int) -> None:
        if working != self._reported and self.on_working_bytes is not None:
            self._reported = working
            self.on_working_bytes(working)

    def end_batch(self) -> None:
        """The batch drained (or failed): close its routings and let its stacked blocks go."""
        for kind in list(self._routings):
            self._close(kind)
        self._stacks.clear()
        self._report(0)
