"""Per-row adapter selection: row i of a batch uses adapter ``names[i]`` (or ``"__base__"``) in ONE forward.

A :class:`RowRouting` is active in a context variable around the wrapped model's forward / generate; every
``BoneLinear`` reads it. Per layer, a plan is built once and, outside autograd, kept on the layer, tagged with
the routing that built it and the batch size, so every later forward under the same routing (the decode
steps of ``generate``, or of a serving loop through :meth:`bone.BoneModel.routing`) finds it with one
attribute read and one identity check — no dict lookup, no gather, no allocation beyond the outputs:

- Bone / mini rows, grouped by r: ``S_r(x)`` once per group (and once per input tensor: sibling projections
  such as q/k/v or gate/up share it), a per-row block tensor ``(rows, r, out)`` gathered once from the
  adapters' blocks (zeros for rows that are base or use another group), one in-place ``baddbmm_`` into the
  base output. Every row using the same Bone adapter takes one ``addmm_`` with that adapter's block instead.
- Bat rows, grouped per Bat adapter (a loop over distinct adapters, never over rows): the adapter's dense
  weight, one ``F.linear`` over its rows, written back with ``index_copy``.

Gradients flow through the gathered blocks when grad mode is on (nothing is cached then). ``miss_dropout``
is not applied in per-row mode (it is a serving path). Gradient checkpointing recomputes outside the routing
context, so it cannot be combined with per-row selection.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as BF
from .config import BoneConfig
from .errors import BoneError
from .linear_types import Conv1D

_ROUTING: contextvars.ContextVar[RowRouting | None] = contextvars.ContextVar("bone_routing", default=None)

# The routing active around the current forward, or None. The bound ``get`` itself: every layer asks on
# every forward, so no wrapper call is added to the decode path.
current_routing = _ROUTING.get


class RoutedLayer(Protocol):
    """What routing asks of a layer (``bone.layer.BoneLinear`` provides it); declared here so routing never
    imports the layer, which imports routing."""

    base_layer: nn.Linear | Conv1D
    out_features: int
    merged_adapters: list[str]
    adapter_config: dict[str, BoneConfig]
    row_plan: Any  # routing's slot on the layer; the layer empties it whenever it changes
    plain_linear: bool  # exactly nn.Linear: the fused serving path may call F.linear on its weight

    @property
    def version(self) -> int: ...

    @property
    def disabled(self) -> bool: ...

    def full_block(self, name: str) -> torch.Tensor: ...

    def effective_weight(self, names: Iterable[str], weight: torch.Tensor | None = None) -> torch.Tensor: ...


class RowRouting:
    """Which adapter each row uses, and the per-layer plans built for it (kept until :meth:`close`)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._plans: dict[RoutedLayer, RowPlan] = {}  # outside autograd: the plans built for this routing
        self._expanded: dict[int, list[str]] = {}

    def row_names(self, rows: int) -> list[str]:
        """Names per row of a batch of ``rows`` rows; generate() expands each input row k times in place
        (repeat_interleave: beams, num_return_sequences), so row j belongs to input row j // k."""
        n = len(self.names)
        if rows == n:
            return self.names
        hit = self._expanded.get(rows)
        if hit is not None:
            return hit
        if rows % n:
            raise BoneError(
                f"adapter_names has {n} entries but a layer received a batch of {rows} rows; "
                "give one adapter name per input row"
            )
        k = rows // n
        names = self._expanded[rows] = [name for name in self.names for _ in range(k)]
        return names

    def plan(self, layer: RoutedLayer, rows: int, device: torch.device) -> RowPlan:
        if torch.is_grad_enabled():  # gathered blocks must carry the graph: never reused
            return RowPlan.build(layer, self.row_names(rows), device)
        # The layer's slot holds the plan of the routing that ran last; this routing's own dict keeps its
        # plans too, so alternating routings (e.g. prefill of newcomers between decode steps) never rebuild.
        # ``layer.version`` changes whenever the layer does (adapters added/deleted, merge, .to()).
        p = self._plans.get(layer)
        if p is None or p.rows != rows or p.version != layer.version:
            p = RowPlan.build(layer, self.row_names(rows), device)
            p.routing, p.rows, p.version = self, rows, layer.version
            self._plans[layer] = p
        layer.row_plan = p
        return p

    def close(self) -> None:
        """Drop the cached plans (and the gathered blocks they hold)."""
        for layer in self._plans:
            if layer.row_plan is not None and layer.row_plan.routing is self:
                layer.row_plan = None
        self._plans.clear()


@contextmanager
def routing_context(names: list[str]):
    """Per-row selection for the enclosed forwards; the plans live as long as the context."""
    routing = RowRouting(names)
    token = _ROUTING.set(routing)
    try:
        yield routing
    finally:
        _ROUTING.reset(token)
        routing.close()


class RoutedModel:
    """A model whose forwards run with one per-row routing: ``BoneModel.routing(names)`` yields one.

    Calling it (or its ``forward`` / ``generate``) runs the wrapped Hugging Face model with row i using
    adapter ``names[i]``; every call reuses the per-layer plans built by the first one, so a decode loop pays
    for the gather once per batch composition, not once per token. Only valid inside its ``with`` block."""

    def __init__(self, model: Any, routing: RowRouting):
        self._model = model
        self._routing: RowRouting | None = routing
        self.names = routing.names

    def __call__(self, *args, **kwargs):
        return self._run(self._model, args, kwargs)

    forward = __call__

    def generate(self, *args, **kwargs):
        return self._run(self._model.generate, args, kwargs)

    def _run(self, fn, args, kwargs):
        if self._routing is None:
            raise BoneError("this routed model was closed (its `with BoneModel.routing(...)` block ended)")
        token = _ROUTING.set(self._routing)
        try:
            return fn(*args, **kwargs)
        finally:
            _ROUTING.reset(token)

    def close(self) -> None:
        if self._routing is not None:
            self._routing.close()
            self._routing = None


class PlanKind(enum.Enum):
    """How one layer serves one routing, from the cheapest case to the general one."""

    BASE = "base"  # no row uses an adapter of this layer
    ONE_BONE = "one_bone"  # every row uses the same Bone block: ``block`` (r, out)
    BONE_GROUP = "bone_group"  # Bone rows of one r: ``block`` gathered per row (rows, r, out), zeros elsewhere
    MIXED = "mixed"  # several r groups and/or Bat rows: the ``bone`` and ``bat`` lists


class RowPlan:
    """What one layer does for one routing (see :class:`PlanKind`)."""

    __slots__ = ("kind", "r", "block", "bone", "bat", "routing", "rows", "version")

    def __init__(self) -> None:
        self.kind = PlanKind.BASE
        self.r = 0
        self.block: torch.Tensor = None  # type: ignore[assignment]  # set, and read, only for ONE_BONE / BONE_GROUP
        self.bone: list[tuple[int, torch.Tensor]] = []  # (r, gathered (rows, r, out))
        self.bat: list[tuple[torch.Tensor, torch.Tensor]] = []  # (row index, dense logical weight)
        self.routing: RowRouting | None = None
        self.rows = 0
        self.version = -1

    @classmethod
    def build(cls, layer: RoutedLayer, names: list[str], device: torch.device) -> RowPlan:
        if layer.merged_adapters:
            raise BoneError(
                f"per-row adapter selection needs unmerged adapters, but {layer.merged_adapters} are merged; "
                "call unmerge_adapter() first"
            )
        p = cls()
        configs = layer.adapter_config
        present = [n for n in dict.fromkeys(names) if n in configs]
        if not present:
            return p
        bone = [n for n in present if configs[n].variant != "bat"]
        if len(bone) == 1 and len(present) == 1 and all(n == bone[0] for n in names):
            p.kind, p.r, p.block = PlanKind.ONE_BONE, configs[bone[0]].r, layer.full_block(bone[0])
            return p
        by_r: dict[int, list[str]] = {}
        for n in bone:
            by_r.setdefault(configs[n].r, []).append(n)
        for r, group in by_r.items():
            blocks = {n: layer.full_block(n) for n in group}
            zero = torch.zeros_like(blocks[group[0]])  # rows outside the group
            p.bone.append((r, torch.stack([blocks.get(n, zero) for n in names])))  # one copy per row's block
        for n in present:
            if configs[n].variant == "bat":
                rows = torch.tensor([i for i, m in enumerate(names) if m == n], device=device)
                p.bat.append((rows, layer.effective_weight([n])))
        if len(p.bone) == 1 and not p.bat:
            p.kind, (p.r, p.block) = PlanKind.BONE_GROUP, p.bone[0]
        else:
            p.kind = PlanKind.MIXED
        return p


def row_forward(layer: RoutedLayer, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
    if x.dim() < 2:
        raise BoneError("per-row adapter selection needs inputs with a leading batch dimension")
    rows = x.shape[0]
    plan = layer.row_plan
    if plan is None or plan.routing is not routing or plan.rows != rows or torch.is_grad_enabled():
        # checked here only: disabling empties the layer's plan slot, so a cached plan implies enabled
        if layer.disabled:
            raise BoneError("adapter_names cannot be used inside disable_adapter()")
        plan = routing.plan(layer, rows, x.device)
    kind = plan.kind
    base = layer.base_layer
    if kind is PlanKind.BASE:
        return base(x)
    grad = torch.is_grad_enabled()
    out = layer.out_features
    if kind is not PlanKind.MIXED and not grad:
        blk = plan.block
        w = base.weight
        if x.dtype == w.dtype == blk.dtype and x.is_contiguous() and layer.plain_linear:
            # the serving hot path: base gemm, the (shared) chunk sum, one fused accumulate into y
            y = F.linear(x, w, base.bias)
            s = BF.cached_chunk_sum(x, plan.r)
            if kind is PlanKind.ONE_BONE:
                y.view(-1, out).addmm_(s, blk)
            else:
                y.view(rows, -1, out).baddbmm_(s.view(rows, -1, plan.r), blk)
            return y
    y = base(x)
    bone = plan.bone if kind is not PlanKind.ONE_BONE else [(plan.r, plan.block)]
    for r, g in bone:
        uniform = g.dim() == 2
        if not grad and y.dtype == g.dtype == x.dtype and y.is_contiguous() and x.is_contiguous():
            s = BF.cached_chunk_sum(x, r)
            if uniform:
                y.view(-1, out).addmm_(s, g)
            else:
                y.view(rows, -1, out).baddbmm_(s.view(rows, -1, r), g)
        else:
            s = BF.chunk_sum(x.to(g.dtype), r)
            if uniform:
                y = y + (s @ g).to(y.dtype)
            else:
                y = y + torch.bmm(s.reshape(rows, -1, r), g).view(y.shape).to(y.dtype)
    bias = base.bias
    for idx, w in plan.bat:
        xb = x.index_select(0, idx).to(w.dtype)
        yb = F.linear(xb, w, None if bias is None else bias.to(w.dtype)).to(y.dtype)
        y = y.index_copy(0, idx, yb)
    return y if y.dtype == x.dtype else y.to(x.dtype)
