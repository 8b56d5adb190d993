"""Per-row adapter selection: row i of a batch uses adapter ``names[i]`` (or ``"__base__"``) in ONE forward.

A :class:`RowRouting` is active in a context variable around the wrapped model's forward / generate; every
``BoneLinear`` reads it. Per layer, a plan is built once and, outside autograd, kept on the layer, tagged with
the routing that built it and the batch size, so every later forward under the same routing (the decode
steps of ``generate``, or of a serving loop through :meth:`bone.BoneModel.routing`) finds it with one
attribute read and one identity check — no dict lookup, no gather, no allocation beyond the outputs:

- Bone / mini rows, one segment per adapter (its rows: a slice when they are contiguous, else an index
  tensor): ``S_r(x)`` once per r (and once per input tensor: sibling projections such as q/k/v or gate/up
  share it), then per adapter one matmul of its rows' chunk sums with that adapter's own block, accumulated
  into the base output in place (``addmm_`` on a slice, ``index_add_`` by index). Each block is read once per
  layer per forward and never copied per row (the SGMV idea of Punica / S-LoRA on plain torch ops). When every
  row uses the same Bone adapter, one ``addmm_`` with its block.
- Bat rows, grouped per Bat adapter (a loop over distinct adapters, never over rows): the adapter's dense
  weight (out × in: the expensive case), one ``F.linear`` over its rows, written back with ``index_copy``.
  Held for the routing's life within ``bat_budget_bytes``, rebuilt per forward past it.

What a routing costs beyond the resident blocks is :attr:`RowRouting.working_bytes` (held index tensors and
Bat weights, plus the largest per-layer scratch, bounded by the layer's own output size).

Gradients flow through the blocks when grad mode is on (nothing is cached then). ``miss_dropout``
is not applied in per-row mode (it is a serving path). Gradient checkpointing recomputes outside the routing
context, so it cannot be combined with per-row selection.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as BF
from .block_stacks import BlockStacks
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
    def state_version(self) -> int: ...

    @property
    def disabled(self) -> bool: ...

    @property
    def block_params(self) -> dict[str, nn.Parameter]: ...  # name -> block parameter (its identity tells a

    # stack or a kept plan that it still holds that adapter's block)

    def full_block(self, name: str) -> torch.Tensor: ...

    def effective_weight(self, names: Iterable[str], weight: torch.Tensor | None = None) -> torch.Tensor: ...


class RowRouting:
    """Which adapter each row uses, and the per-layer plans built for it (kept until :meth:`close`).

    ``bat_budget_bytes``: how many bytes of dense Bat weights the plans may hold between forwards (None: no
    limit); past it a Bat adapter's weight is rebuilt per forward and freed at once (slower, bounded).
    ``working_bytes``: what the routing costs beyond the resident blocks — the bytes its plans hold, its row
    indexes (shared by the layers), its stacked blocks when they are its own, plus the largest transient
    scratch of one layer's forward."""

    def __init__(self, names: list[str], bat_budget_bytes: int | None = None, stacks: BlockStacks | None = None):
        self.names = list(names)
        self._plans: dict[RoutedLayer, RowPlan] = {}  # outside autograd: the plans built for this routing
        self._expanded: dict[int, list[str]] = {}
        self._groups: dict[int, dict[str, list[int]]] = {}  # per batch size: row_groups, shared by every layer
        self.indexes: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}  # row indexes, shared too
        self.index_bytes = 0
        self.bat_budget_bytes = bat_budget_bytes
        self.held_bytes = 0
        self.scratch_bytes = 0
        self.closed = False
        # The stacked blocks of one-row adapters (see bone.block_stacks): shared with the other routings of a
        # serving loop's running batch when given (their owner counts and frees them), else this routing's own.
        self._own_stacks = stacks is None
        self.stacks = BlockStacks() if stacks is None else stacks
        self._stacks_at_start = self.stacks.held_bytes

    @property
    def working_bytes(self) -> int:
        own_stacks = self.stacks.held_bytes if self._own_stacks else 0
        return self.held_bytes + self.index_bytes + self.scratch_bytes + own_stacks

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

    def plan(self, layer: RoutedLayer, rows: int, x: torch.Tensor) -> RowPlan:
        tokens = x[0].numel() // x.shape[-1] if x.numel() else 0
        if torch.is_grad_enabled():  # segments must carry the graph: never reused, nothing held
            return RowPlan.build(layer, self.row_names(rows), x.device, tokens, 0)
        return self._plan(layer, rows, x.device, tokens)

    def prepare(self, layers: Iterable[RoutedLayer], rows: int, tokens: int) -> None:
        """Build (or check) every layer's plan now, one after the other, before the forward that needs them:
        built between that forward's large matmuls, each plan's Python ran with cold caches (165 against 60 us
        a layer at 64 rows on the CPU bench), and a 7B model has 224 adapted layers."""
        for layer in layers:
            if not layer.disabled and not layer.merged_adapters:
                self._plan(layer, rows, layer.base_layer.weight.device, tokens)

    def _plan(self, layer: RoutedLayer, rows: int, device: torch.device, tokens: int) -> RowPlan:
        # The layer's slot holds the plan of the routing that ran last; this routing's own dict keeps its
        # plans too, so alternating routings (e.g. prefill of newcomers between decode steps) never rebuild.
        # ``layer.version`` changes whenever the layer does (adapters added/deleted, merge, .to()); a plan whose
        # own adapters and the layer's state are untouched is kept (RowPlan.still_valid).
        p = self._plans.get(layer)
        groups = self._groups.get(rows)
        if groups is None:
            groups = self._groups[rows] = row_groups(self.row_names(rows))
        if p is not None and p.rows == rows and p.version != layer.version and p.still_valid(layer, groups):
            p.version = layer.version  # only other adapters came or went: nothing this plan reads changed
        if p is None or p.rows != rows or p.version != layer.version:
            if p is not None:
                self.held_bytes -= p.held_bytes
            budget = None
            if self.bat_budget_bytes is not None:  # the room left: minus what this routing holds and stacked
                grown = max(0, self.stacks.held_bytes - self._stacks_at_start)
                budget = max(0, self.bat_budget_bytes - self.held_bytes - self.index_bytes - grown)
            p = RowPlan.build(layer, self.row_names(rows), device, tokens, budget, self, groups)
            p.routing, p.rows, p.version = self, rows, layer.version
            self._plans[layer] = p
            self.held_bytes += p.held_bytes
            self.scratch_bytes = max(self.scratch_bytes, p.scratch_bytes)
        layer.row_plan = p
        return p

    def forget(self, layer: RoutedLayer) -> None:
        """Drop this routing's plan of ``layer`` (another routing took the slab its stacked blocks view); the
        next forward under this routing builds it again."""
        p = self._plans.pop(layer, None)
        if p is not None:
            self.held_bytes -= p.held_bytes
            if layer.row_plan is p:
                layer.row_plan = None

    def close(self) -> None:
        """Drop the cached plans (and the index tensors and Bat weights they hold; the stacks too when they
        are this routing's own)."""
        for layer in self._plans:
            if layer.row_plan is not None and layer.row_plan.routing is self:
                layer.row_plan = None
        self._plans.clear()
        self.indexes.clear()
        self.held_bytes = self.scratch_bytes = self.index_bytes = 0
        self.closed = True
        if self._own_stacks:
            self.stacks.clear()


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

    def prepare(self, layers: Iterable[RoutedLayer], rows: int, tokens: int = 1) -> None:
        """Build every layer's plan for ``rows`` rows now (see :meth:`RowRouting.prepare`)."""
        if self._routing is not None:
            self._routing.prepare(layers, rows, tokens)

    @property
    def working_bytes(self) -> int:
        """Bytes the routing's plans cost beyond the resident blocks (see :class:`RowRouting`)."""
        return 0 if self._routing is None else self._routing.working_bytes

    def close(self) -> None:
        if self._routing is not None:
            self._routing.close()
            self._routing = None


class PlanKind(enum.Enum):
    """How one layer serves one routing, from the cheapest case to the general one."""

    BASE = "base"  # no row uses an adapter of this layer
    ONE_BONE = "one_bone"  # every row uses the same Bone block: ``block`` (r, out)
    SEGMENTS = "segments"  # rows grouped by adapter: the ``bone`` segments and/or ``bat`` rows


# One adapter's segment: ``(start, stop, index, block)``. Its rows are ``start:stop`` when contiguous in the
# batch (index None: accumulated straight into the output, no scratch), else ``index`` (the chunk sums of
# those rows and their product with the block are the only scratch).
Segment = tuple[int, int, torch.Tensor | None, torch.Tensor]

# On CPU, PyTorch's bf16/fp16 gemms are emulated unless the core has AVX512-BF16/AMX: the small adapter gemms
# (K = r) ran 1.6-20x slower than in fp32 (decode: 82 vs 50 us; a 512-token prefill: 3.7 ms vs 0.17 ms per
# projection, bench/serve.py tiny, EPYC with AVX2 only). So outside autograd a CPU plan holds an fp32 copy of
# each half-precision block (exact: a widening cast), takes the chunk sum with fp32 accumulation (one
# (tokens, r) tensor) and adds the fp32 product to the half output in place: one rounding, as before. GPUs
# keep the same-dtype path (their half gemms are native).
_CPU_WIDEN = (torch.bfloat16, torch.float16)


def _widens(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a no-grad plan multiplies blocks of ``dtype`` in fp32 (CPU half precision, see _CPU_WIDEN)."""
    return device.type == "cpu" and dtype in _CPU_WIDEN and not torch.is_grad_enabled()


def _widen(blk: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The block a no-grad plan multiplies with: fp32 on CPU for half blocks (see _CPU_WIDEN), else itself."""
    return blk.float() if _widens(blk.dtype, device) else blk


class RowPlan:
    """What one layer does for one routing (see :class:`PlanKind`).

    ``bone``: per (r, dtype) group, the segments ``(rows, block)``, one per adapter; ``block`` is the
    adapter's own (r, out) tensor, never a copy (mini blocks are tiled once per plan). ``bat``: per Bat
    adapter, its rows and either its dense (out, in) weight held for the routing's life, or None when the
    routing's Bat budget is spent (then it is rebuilt per forward and freed at once).
    ``held_bytes``: what the plan keeps alive (held Bat weights, fp32 copies of half blocks on CPU; its row
    indexes are the routing's, shared by every layer: ``RowRouting.index_bytes``); ``scratch_bytes``: the
    transient peak of one forward for the tokens of the call that built it (at most rows × tokens ×
    (r + out) × itemsize: no more than the layer's own output)."""

    __slots__ = (
        "kind",
        "r",
        "block",
        "bone",
        "bat",
        "routing",
        "rows",
        "version",
        "held_bytes",
        "scratch_bytes",
        "widened",
        "singles",
        "state_version",
        "present",
        "uses",
    )

    def __init__(self) -> None:
        self.kind = PlanKind.BASE
        self.r = 0
        self.block: torch.Tensor = None  # type: ignore[assignment]  # set, and read, only for ONE_BONE
        self.bone: list[tuple[int, list[Segment]]] = []
        self.bat: list[tuple[torch.Tensor, str, torch.Tensor | None]] = []  # (row index, adapter, held weight)
        self.routing: RowRouting | None = None
        self.rows = 0
        self.version = -1
        self.held_bytes = 0
        self.scratch_bytes = 0
        self.widened = False  # blocks are fp32 copies of half blocks (CPU, see _CPU_WIDEN)
        # per r, the adapters that own exactly one row, as (their rows, their blocks stacked (n, r, out)): one
        # bmm instead of n small gemms. In widened plans the stack replaces those adapters' separate fp32 copies
        # (no extra memory); otherwise it is a copy, held within the routing's budget (see build).
        self.singles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # what the plan was built from, to tell whether a later layer version still serves it (still_valid)
        self.state_version = -1
        self.present: tuple[str, ...] = ()  # the routing's adapters this layer had, in order
        self.uses: tuple[tuple[torch.Tensor, int], ...] = ()  # their block parameters and in-place versions

    def still_valid(self, layer: RoutedLayer, rows_of: dict[str, list[int]]) -> bool:
        """Whether only adapters this plan does not use were added or deleted since it was built: the layer's
        state is the same, the routing's adapters present on the layer are the same, and each still has the
        same block parameter, unmodified (a serving pool loads and evicts others while a batch runs)."""
        if self.state_version != layer.state_version:
            return False
        configs, blocks = layer.adapter_config, layer.block_params
        if tuple(n for n in rows_of if n in configs) != self.present:
            return False
        return all(blocks.get(n) is param and param._version == v for n, (param, v) in zip(self.present, self.uses))

    @classmethod
    def build(
        cls,
        layer: RoutedLayer,
        names: list[str],
        device: torch.device,
        tokens: int = 1,
        bat_budget: int | None = None,
        routing: RowRouting | None = None,
        rows_of: dict[str, list[int]] | None = None,
    ) -> RowPlan:
        """``tokens``: per row, for the scratch estimate; ``bat_budget``: bytes of dense Bat weights (and
        stacked blocks) this plan may hold (None: no limit, 0: hold none); ``routing``: the routing that keeps
        the plan (its ``stacks`` hold the stacked one-row blocks); None for a plan used once (autograd);
        ``rows_of``: ``row_groups(names)``, when the caller keeps it for every layer."""
        if layer.merged_adapters:
            raise BoneError(
                f"per-row adapter selection needs unmerged adapters, but {layer.merged_adapters} are merged; "
                "call unmerge_adapter() first"
            )
        p = cls()
        configs = layer.adapter_config
        if rows_of is None:
            rows_of = row_groups(names)
        present = [n for n in rows_of if n in configs]
        blocks = layer.block_params  # a plain dict: one lookup per adapter per layer whenever the batch changes
        p.state_version, p.present = layer.state_version, tuple(present)
        uses = [blocks[n] for n in present]
        p.uses = tuple((param, param._version) for param in uses)
        if not present:
            return p
        bats = [n for n in present if configs[n].variant == "bat"]
        bone = [n for n in present if n not in bats] if bats else present
        if len(bone) == 1 and len(present) == 1 and len(rows_of) == 1:  # every row on the one Bone adapter
            full = layer.full_block(bone[0])
            p.kind, p.r, p.block = PlanKind.ONE_BONE, configs[bone[0]].r, _widen(full, device)
            if p.block is not full:
                p.widened, p.held_bytes = True, p.block.numel() * 4
                p.scratch_bytes = len(names) * tokens * (p.r + layer.out_features) * 4
            return p
        p.kind = PlanKind.SEGMENTS
        out = layer.out_features
        # per (r, dtype the plan multiplies in): the Bone/mini adapters, as (name, rows, block parameter)
        members: dict[tuple[int, torch.dtype], list[tuple[str, list[int], torch.Tensor]]] = {}
        widened_keys: set[tuple[int, torch.dtype]] = set()  # groups holding fp32 copies of half blocks (see _CPU_WIDEN)
        for n, param in zip(present, uses):
            if bats and n in bats:
                continue
            dt = torch.float32 if _widens(param.dtype, device) else param.dtype
            key = (param.shape[0], dt)
            members.setdefault(key, []).append((n, rows_of[n], param))
            if dt is not param.dtype:
                widened_keys.add(key)
        groups: dict[tuple[int, torch.dtype], list[Segment]] = {}
        for key, group in members.items():
            # (already in row order: ``rows_of`` lists names by their first row)
            one = [m for m in group if len(m[1]) == 1]
            stack = None
            widened = key in widened_keys
            if len(one) >= 2 and routing is not None:
                # Adapters owning one row each (a mixed decode batch: every row its own adapter) go through one
                # bmm over their stacked blocks instead of one small gemm each (64 adapters: 64 calls per
                # projection, launch- and overhead-bound). The stack is a slab kept across the batch's
                # compositions (bone.block_stacks: a join or leave copies only the blocks that moved). Widened
                # plans would hold fp32 copies of those blocks anyway; otherwise the slab is held only within
                # ``bat_budget`` (the room the pool leaves a batch), else the segments stay.
                before = routing.stacks.held_bytes
                stack = routing.stacks.stack(
                    layer,
                    key[0],
                    key[1],
                    [m[2] for m in one],
                    _block_getter(layer, [m[0] for m in one]),
                    None if widened else bat_budget,
                    routing,
                )
                if bat_budget is not None:
                    bat_budget = max(0, bat_budget - (routing.stacks.held_bytes - before))
            elif routing is not None:
                routing.stacks.drop(layer, key[0], key[1], routing)
            if stack is not None:
                rows_t = _index([m[1][0] for m in one], device, routing)
                p.singles[key[0]] = (rows_t, stack)
                p.widened = p.widened or widened
                p.scratch_bytes += len(one) * tokens * (key[0] + out) * stack.element_size()
                group = [m for m in group if len(m[1]) != 1]
            segs = groups.setdefault(key, [])
            for n, idx, _ in group:
                full = layer.full_block(n)
                blk = _widen(full, device)
                if blk is not full:
                    p.widened = True
                    p.held_bytes += blk.numel() * 4
                sel = None
                if idx[-1] - idx[0] + 1 != len(idx):
                    sel = _index(idx, device, routing)
                    p.scratch_bytes += len(idx) * tokens * (blk.shape[0] + out) * blk.element_size()
                segs.append((idx[0], idx[-1] + 1, sel, blk))
        p.bone = [(r, segs) for (r, _), segs in groups.items()]
        if p.widened:  # the fp32 scratch of one group: (rows, tokens, r + out)
            p.scratch_bytes += len(names) * tokens * (max(groups)[0] + out) * 4
        for n in bats:
            rows = _index(rows_of[n], device, routing)
            blk = layer.full_block(n)
            w = layer.base_layer.weight
            size = w.numel() * blk.element_size()
            p.scratch_bytes += len(rows_of[n]) * tokens * out * blk.element_size()
            if bat_budget is None or size <= bat_budget:
                p.bat.append((rows, n, layer.effective_weight([n])))
                p.held_bytes += size
                bat_budget = None if bat_budget is None else bat_budget - size
            else:  # over the budget: the dense weight lives for one forward only
                p.bat.append((rows, n, None))
                p.scratch_bytes += size
        return p


def _index(rows: list[int], device: torch.device, routing: RowRouting | None) -> torch.Tensor:
    """A row index tensor, made once per routing and shared by every layer (the same rows recur in each);
    counted in the routing's ``index_bytes``."""
    key = (device, tuple(rows))
    t = None if routing is None else routing.indexes.get(key)
    if t is None:
        t = torch.tensor(rows, device=device)
        if routing is not None:
            routing.indexes[key] = t
            routing.index_bytes += t.numel() * t.element_size()
    return t


def row_groups(names: list[str]) -> dict[str, list[int]]:
    """Each name's rows, ascending, names in order of first appearance."""
    rows_of: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        rows_of.setdefault(n, []).append(i)
    return rows_of


def _block_getter(layer: RoutedLayer, names: list[str]) -> Callable[[int], torch.Tensor]:
    """The i-th adapter's block in its Bone form, fetched only when a stack must copy it (mini blocks are
    tiled on every call)."""
    return lambda i: layer.full_block(names[i])


def row_forward(layer: RoutedLayer, x: torch.Tensor, routing: RowRouting) -> torch.Tensor:
    if x.dim() < 2:
        raise BoneError("per-row adapter selection needs inputs with a leading batch dimension")
    rows = x.shape[0]
    plan = layer.row_plan
    if plan is None or plan.routing is not routing or plan.rows != rows or torch.is_grad_enabled():
        # checked here only: disabling empties the layer's plan slot, so a cached plan implies enabled
        if layer.disabled:
            raise BoneError("adapter_names cannot be used inside disable_adapter()")
        plan = routing.plan(layer, rows, x)
    kind = plan.kind
    base = layer.base_layer
    if kind is PlanKind.BASE:
        return base(x)
    grad = torch.is_grad_enabled()
    out = layer.out_features
    w = base.weight
    fused = not grad and x.is_contiguous() and layer.plain_linear and x.dtype == w.dtype
    if kind is PlanKind.ONE_BONE:
        blk = plan.block
        if fused and blk.dtype == x.dtype:
            # the serving hot path: base gemm, the (shared) chunk sum, one fused accumulate into y
            y = F.linear(x, w, base.bias)
            y.view(-1, out).addmm_(BF.cached_chunk_sum(x, plan.r), blk)
            return y
        if fused and plan.widened:  # CPU half precision: the adapter gemm in fp32 (see _CPU_WIDEN)
            y = F.linear(x, w, base.bias)
            y.view(-1, out).add_(torch.mm(BF.cached_chunk_sum(x, plan.r, torch.float32), blk))
            return y
        y = base(x)
        y = y + (BF.chunk_sum(x.to(blk.dtype), plan.r) @ blk).to(y.dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    y = F.linear(x, w, base.bias) if fused else base(x)
    if not grad and not y.is_contiguous():
        y = y.contiguous()
    tokens = y.numel() // (rows * out)  # per row
    if grad and plan.bone and all(seg[2] is None for _, segs in plan.bone for seg in segs):
        y = y + _contiguous_delta(plan, x, rows, tokens, out).to(y.dtype)
        plan_bone: list = []
    else:
        plan_bone = plan.bone
    for r, segs in plan_bone:
        single = plan.singles.get(r)  # adapters with one row each, stacked (see RowPlan.build)
        dt = segs[0][3].dtype if segs or single is None else single[1].dtype  # no segs: all in the stack
        # S_r(x) once per group (and shared with sibling projections that read the same input): (rows*tokens, r)
        if not grad and x.is_contiguous():
            s = BF.cached_chunk_sum(x, r, dt)
        else:
            s = BF.chunk_sum(x.reshape(-1, x.shape[-1]), r, dt)
        if plan.widened and not grad:
            # CPU half precision (see _CPU_WIDEN): fp32 products of every segment into one fp32 scratch,
            # added to y once (zeros for rows of no adapter in this group)
            if single is not None and not segs and single[0].numel() == rows:
                # every row its own adapter, rows in order (a mixed decode step): one bmm straight into y
                y.view(rows, tokens, out).add_(torch.bmm(s.view(rows, tokens, r), single[1]))
                continue
            sc = y.new_zeros((rows * tokens, out), dtype=torch.float32)
            if single is not None:  # adapters with one row each: one bmm with their stacked blocks
                one_rows, stack = single
                sc3 = sc.view(rows, tokens, out)
                sc3.index_copy_(0, one_rows, torch.bmm(s.view(rows, tokens, r).index_select(0, one_rows), stack))
            for a, b, idx, blk in segs:
                if idx is None:
                    torch.mm(s[a * tokens : b * tokens], blk, out=sc[a * tokens : b * tokens])
                else:
                    sc3 = sc.view(rows, tokens, out)
                    sc3.index_copy_(0, idx, torch.matmul(s.view(rows, tokens, r).index_select(0, idx), blk))
            y.view(-1, out).add_(sc)
        elif not grad and dt == y.dtype:
            y2 = y.view(-1, out)
            if single is not None:
                one_rows, stack = single
                s3, y3 = s.view(rows, tokens, r), y.view(rows, tokens, out)
                if one_rows.numel() == rows:  # every row its own adapter, rows in order: accumulate into y
                    y3.baddbmm_(s3, stack)
                else:
                    y3.index_add_(0, one_rows, torch.bmm(s3.index_select(0, one_rows), stack))
            for a, b, idx, blk in segs:
                if idx is None:  # contiguous rows: accumulate straight into y, no scratch
                    y2[a * tokens : b * tokens].addmm_(s[a * tokens : b * tokens], blk)
                else:  # each adapter's block read once, for all of its rows
                    y3 = y.view(rows, tokens, out)
                    y3.index_add_(0, idx, torch.matmul(s.view(rows, tokens, r).index_select(0, idx), blk))
        else:  # autograd or a block dtype other than the output's: out of place
            y3, s3 = y.reshape(rows, tokens, out), s.reshape(rows, tokens, r)
            if single is not None:
                one_rows, stack = single
                y3 = y3.index_add(0, one_rows, torch.bmm(s3.index_select(0, one_rows), stack).to(y3.dtype))
            for a, b, idx, blk in segs:
                if idx is None:
                    idx = torch.arange(a, b, device=y.device)
                y3 = y3.index_add(0, idx, torch.matmul(s3.index_select(0, idx), blk).to(y3.dtype))
            y = y3.reshape(y.shape)
    bias = base.bias
    for idx, name, held in plan.bat:
        wb = held if held is not None else layer.effective_weight([name])
        xb = x.index_select(0, idx).to(wb.dtype)
        yb = F.linear(xb, wb, None if bias is None else bias.to(wb.dtype)).to(y.dtype)
        y = y.index_copy(0, idx, yb)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _contiguous_delta(plan: RowPlan, x: torch.Tensor, rows: int, tokens: int, out: int) -> torch.Tensor:
    """Autograd, every Bone adapter's rows contiguous (a co-training batch is concatenated per job): each
    segment's ``S_r(x) @ block``, zeros for rows of no Bone adapter, joined into one (rows, tokens, out) delta,
    so the output is added to once instead of copied once per adapter (what ``index_add`` out of place does)."""
    parts: list[tuple[int, int, torch.Tensor]] = []
    for r, segs in plan.bone:
        s3 = BF.chunk_sum(x.reshape(-1, x.shape[-1]), r, segs[0][3].dtype).reshape(rows, tokens, r)
        parts += [(a, b, torch.matmul(s3[a:b], blk)) for a, b, _, blk in segs]
    parts.sort(key=lambda part: part[0])
    pieces, at = [], 0
    for a, b, delta in parts:
        if a > at:
            pieces.append(delta.new_zeros(a - at, tokens, out))
        pieces.append(delta)
        at = b
    if at < rows:
        pieces.append(parts[0][2].new_zeros(rows - at, tokens, out))
    joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return joined.reshape(*x.shape[:-1], out)
