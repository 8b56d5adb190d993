"""Per-row adapter selection: row i of a batch uses adapter ``names[i]`` (or ``"__base__"``) in ONE forward.

``BoneModel`` installs a :class:`RowRouting` in a context variable around the wrapped model's forward /
generate; every ``BoneLinear`` reads it. Per layer, a plan is built once (and, outside autograd, cached on
the routing object, so ``generate`` builds it once and reuses it on every decode step):

- Bone / mini rows, grouped by r: ``S_r(x)`` once per group, a per-row block tensor ``(rows, r, out)``
  gathered from the stacked blocks (zeros for rows that are base or use another group), one ``baddbmm``.
- Bat rows, grouped per Bat adapter (a loop over distinct adapters, never over rows): the adapter's dense
  weight, one ``F.linear`` over its rows, written back with ``index_copy``.

Gradients flow through the gathered blocks when grad mode is on (no cache then). ``miss_dropout`` is not
applied in per-row mode (it is a serving path). Gradient checkpointing recomputes outside the routing
context, so it cannot be combined with per-row selection.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import functional as BF
from .errors import BoneError

if TYPE_CHECKING:  # pragma: no cover
    from .layer import BoneLinear

BASE_ADAPTER = "__base__"

_ROUTING: contextvars.ContextVar["RowRouting | None"] = contextvars.ContextVar("bone_routing", default=None)


def current_routing() -> "RowRouting | None":
    return _ROUTING.get()


class RowRouting:
    def __init__(self, names: list[str]):
        self.names = list(names)
        self._cache: dict = {}

    def row_names(self, rows: int) -> list[str]:
        """Names per row of a batch of ``rows`` rows; generate() expands each input row k times in place
        (repeat_interleave: beams, num_return_sequences), so row j belongs to input row j // k."""
        n = len(self.names)
        if rows == n:
            return self.names
        if rows % n:
            raise BoneError(
                f"adapter_names has {n} entries but a layer received a batch of {rows} rows; "
                "give one adapter name per input row"
            )
        k = rows // n
        return [name for name in self.names for _ in range(k)]

    def plan(self, layer: "BoneLinear", rows: int, device: torch.device) -> "_Plan":
        cacheable = not torch.is_grad_enabled()
        key = (id(layer), rows, device)
        if cacheable:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        p = _Plan.build(layer, self.row_names(rows), device)
        if cacheable:
            self._cache[key] = p
        return p


@contextmanager
def routing_context(names: list[str]):
    token = _ROUTING.set(RowRouting(names))
    try:
        yield
    finally:
        _ROUTING.reset(token)


@contextmanager
def no_routing():
    """Run the enclosed code without per-row selection (e.g. a nested forward of another model)."""
    token = _ROUTING.set(None)
    try:
        yield
    finally:
        _ROUTING.reset(token)


class _Plan:
    __slots__ = ("uniform", "bone", "bat")

    def __init__(self):
        self.uniform: list[tuple[int, torch.Tensor]] = []  # every row uses one Bone block: (r, block)
        self.bone: list[tuple[int, torch.Tensor]] = []  # (r, gathered (rows, r, out))
        self.bat: list[tuple[torch.Tensor, torch.Tensor]] = []  # (row index, dense logical weight)

    @classmethod
    def build(cls, layer: "BoneLinear", names: list[str], device: torch.device) -> "_Plan":
        if layer.merged_adapters:
            raise BoneError(
                f"per-row adapter selection needs unmerged adapters, but {layer.merged_adapters} are merged; "
                "call unmerge_adapter() first"
            )
        p = cls()
        present = [n for n in dict.fromkeys(names) if n in layer.bone_block]
        if not present:
            return p
        bone = [n for n in present if layer.bone_variant[n] != "bat"]
        if len(bone) == 1 and len(present) == 1 and all(n == bone[0] for n in names):
            p.uniform.append((layer.bone_r[bone[0]], layer.full_block(bone[0])))
            return p
        by_r: dict[int, list[str]] = {}
        for n in bone:
            by_r.setdefault(layer.bone_r[n], []).append(n)
        for r, group in by_r.items():
            blocks = [layer.full_block(n) for n in group]
            stacked = torch.stack(blocks + [torch.zeros_like(blocks[0])])  # last slot: rows outside the group
            slot = {n: i for i, n in enumerate(group)}
            idx = torch.tensor([slot.get(n, len(group)) for n in names], device=device)
            p.bone.append((r, stacked.index_select(0, idx)))
        for n in present:
            if layer.bone_variant[n] == "bat":
                rows = torch.tensor([i for i, m in enumerate(names) if m == n], device=device)
                p.bat.append((rows, layer.effective_weight([n])))
        return p


def row_forward(layer: "BoneLinear", x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
    if x.dim() < 2:
        raise BoneError("per-row adapter selection needs inputs with a leading batch dimension")
    if layer._disabled:
        raise BoneError("adapter_names cannot be used inside disable_adapter()")
    rows = x.shape[0]
    plan = routing.plan(layer, rows, x.device)
    y = layer.base_layer(x)
    if not (plan.uniform or plan.bone or plan.bat):
        return y
    out = layer.out_features
    grad = torch.is_grad_enabled()
    fin = layer.in_features
    for r, blk in plan.uniform:
        if not grad and y.dtype == blk.dtype == x.dtype and y.is_contiguous() and x.is_contiguous():
            y.view(-1, out).addmm_(BF.cached_chunk_sum(x, r), blk)
        else:
            s = BF.chunk_sum(x.to(blk.dtype), r)
            y = y + (s @ blk).to(y.dtype)
    for r, g in plan.bone:
        if not grad and y.dtype == g.dtype == x.dtype and y.is_contiguous() and x.is_contiguous():
            s = BF.cached_chunk_sum(x, r).view(rows, -1, r)
            y.view(rows, -1, out).baddbmm_(s, g)
        else:
            s = BF.chunk_sum(x.to(g.dtype), r).reshape(rows, -1, r)
            y = y + torch.bmm(s, g).view(y.shape).to(y.dtype)
    bias = layer.base_layer.bias
    for idx, w in plan.bat:
        xb = x.index_select(0, idx).to(w.dtype)
        yb = F.linear(xb, w, None if bias is None else bias.to(w.dtype)).to(y.dtype)
        y = y.index_copy(0, idx, yb)
    return y if y.dtype == x.dtype else y.to(x.dtype)
