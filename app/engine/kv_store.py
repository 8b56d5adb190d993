"""The running batch's KV cache, written in place: no column is copied again when a step appends one or a row
joins (issue 15, point 3).

transformers' ``DynamicLayer`` appends each step's column with ``torch.cat``, a copy of the whole cache per
layer per step (quadratic work over a generation), and a join used to concatenate every running row again.
Here each layer holds its keys and values in a buffer ``(slots, heads, capacity, head_dim)`` allocated ahead;
the batch's columns live at ``[start, end)``, its rows at ``[0, rows)``:

- a step writes its column at ``end`` and the attention reads a view ``[:rows, :, start:end]``: nothing
  existing is copied;
- a join writes the newcomers' columns into the free slots ``[rows, rows + n)``, right-aligned (left padding,
  as before: within a row the distance between two columns is the distance between its tokens, all that a
  causal or sliding-window mask looks at); a newcomer wider than the batch takes the columns left of
  ``start`` (zeroed for the running rows: masked padding);
- rows leaving: the last rows move into their slots (only those rows are copied), and columns that became
  padding for every row left are let go by moving ``start`` (no copy);
- a failed step or join is undone by moving the pointers back (nothing existing was overwritten).

Only when the buffer has no room (right: more columns than reserved; left: a newcomer wider than the room
kept there; rows: more than the slots) is it laid out again into a larger one (2x the live columns or the
rows' remaining token budgets, whichever is more, so appends are amortised O(1); bounded by the KV budget in
tokens). Those re-layouts are counted (``bone_engine_kv_relayouts_total`` by reason, and ``Stats``).

A sliding-window layer (Mistral, Phi-3, Gemma 2/3's local layers) keeps only the last ``window - 1`` columns
once a step succeeded (``settle`` moves its ``start``); its ``get_mask_sizes`` is transformers' sliding one,
so the mask places the kept columns from the batch's width. Its buffer is a few windows wide: when the
columns reach its end they are moved back to its start, ``window`` columns every ~``window`` steps.

Padding columns hold zeros, never stale values: attention weighs masked columns by exactly 0, and 0 times a
stale NaN would still be NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from app import metrics

MIN_COLUMNS = 16  # the least room a layer keeps on the right of its columns when laid out


@dataclass
class Plan:
    """What the batch tells its cache about the room to keep when a layer is laid out again."""

    max_rows: int = 1  # slots never grow past this (the batch's row bound), unless more rows are live
    right: int = 0  # columns the rows may still append (their largest remaining max_new_tokens)
    budget_tokens: int | None = None  # slots x columns stay within this (or within what is live)


@dataclass
class Stats:
    """Bytes the cache wrote and moved, for tests and the bench: a step writes its column and moves nothing."""

    written_bytes: int = 0  # new columns written (a step's, a newcomer's)
    copied_bytes: int = 0  # existing columns moved (a re-layout, rows moving into a leaver's slot)
    relayouts: int = 0


class KVLayer(CacheLayerMixin):
    """One attention layer's keys and values in a preallocated buffer (full attention, or a sliding window of
    ``window`` when given)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, window: int | None, plan: Plan, stats: Stats) -> None:
        # not CacheLayerMixin.__init__: ``keys`` and ``values`` are views here, not attributes
        self.is_initialized = False
        self.sliding_window = window
        self.is_sliding = window is not None
        self.plan, self.stats = plan, stats
        self._k = self._v = _NONE  # the buffers, once the first columns come (``is_initialized``)
        self.rows = self.start = self.end = 0
        self.width = 0  # the batch's columns (its attention mask's): what masks and positions count

    # --- what transformers reads ----------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._k[: self.rows, :, self.start : self.end] if self.is_initialized else None

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._v[: self.rows, :, self.start : self.end] if self.is_initialized else None

    @property
    def cumulative_length(self) -> int:  # type: ignore[override]
        return self.width

    @property
    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers themselves (tests: a step that copies nothing leaves their ``data_ptr`` as it was)."""
        return self._k, self._v

    def kept(self, width: int) -> int:
        """The columns this layer holds for a batch ``width`` wide: all, or a window's last ``window - 1``."""
        return width if self.sliding_window is None else min(width, self.sliding_window - 1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.rows = key_states.shape[0]
        # a newcomers' prefill cache (``plan.right`` 0) is exact: it is merged into the batch's, then dropped;
        # a chunked prompt's reserves its whole prompt
        columns = key_states.shape[-2] + self.plan.right
        self._k, self._v = _empty(key_states, self.rows, columns), _empty(value_states, self.rows, columns)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the forward's columns at ``end`` (in place) and return what its attention reads: every column
        (full attention), or the window's kept ones and the new (the sizes ``get_mask_sizes`` announced)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.rows:
            raise ValueError(f"the cache holds {self.rows} rows; the forward has {key_states.shape[0]}")
        q = key_states.shape[-2]
        if self.end + q > self._k.shape[-2]:
            self._lay_out(self.rows, 0, q, "append")
        self._k[: self.rows, :, self.end : self.end + q].copy_(key_states)
        self._v[: self.rows, :, self.end : self.end + q].copy_(value_states)
        self.stats.written_bytes += _nbytes(key_states) + _nbytes(value_states)
        seen = self.kept(self.width) + q
        self.end += q
        self.width += q
        return self._k[: self.rows, :, self.end - seen : self.end], self._v[: self.rows, :, self.end - seen : self.end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask: transformers' for a full and for a sliding-window layer."""
        if self.sliding_window is None:
            return self.width + query_length, 0
        return self.kept(self.width) + query_length, max(self.width - self.sliding_window + 1, 0)

    def get_seq_length(self) -> int:
        return self.width

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        self._k = self._v = _NONE
        self.rows = self.start = self.end = self.width = 0
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select([int(i) for i in indices.tolist()])

    # --- what the batch does between steps ------------------------------------------------------------
    def settle(self) -> None:
        """After a step succeeded: a window lets go of the column it pushed out (kept until now, so a failed
        step could be undone)."""
        self.start = max(self.start, self.end - self.kept(self.width))

    def roll_back(self, width: int) -> None:
        """Forget the columns appended since the batch was ``width`` wide (a failed step)."""
        if self.width > width:
            self.end -= self.width - width
            self.width = width
        self.start = min(self.start, self.end)

    def trim(self, width: int) -> None:
        """The batch is now ``width`` wide (its leading columns were padding for every row left)."""
        self.width = width
        self.start = max(self.start, self.end - self.kept(width))

    def select(self, order: list[int]) -> None:
        """Keep rows ``order`` (old row indices, new order): only rows that change slot are copied."""
        moved = [(i, src) for i, src in enumerate(order) if src != i]
        if moved and self.is_initialized:
            dst = torch.tensor([i for i, _ in moved], device=self._k.device)
            src = torch.tensor([s for _, s in moved], device=self._k.device)
            s, e = self.start, self.end
            # the right side's advanced indexing gathers first: a source that is also a destination is read intact
            self._k[dst, :, s:e] = self._k[src, :, s:e]
            self._v[dst, :, s:e] = self._v[src, :, s:e]
            self.stats.copied_bytes += len(moved) * (_row_bytes(self._k) + _row_bytes(self._v)) * (e - s)
        self.rows = len(order)

    def join(self, other: KVLayer, count: int, width: int, keep: list[int] | None) -> None:
        """Write ``other``'s rows (``keep`` of them, or all) into the slots after this layer's first ``count``
        rows, fitted to a batch ``width`` wide. Only the newcomers' columns are written, unless this buffer
        lacks room (then it is laid out again). Nothing this layer held is overwritten, and its pointers move
        last: an exception leaves it readable as it was (``state`` / ``restore``)."""
        n = other.rows if keep is None else len(keep)
        need = self.kept(width)
        if not self.is_initialized:  # the batch's first rows: a buffer with room on both sides
            self.device = other._k.device
            self.rows = self.width = 0
            slots, left, right = self._room(n, need, 0)
            columns = left + need + right
            self._k, self._v = _empty(other._k, slots, columns), _empty(other._v, slots, columns)
            self.start = self.end = left + need
            self.is_initialized = True
        self.rows = count  # the rows the batch still holds (a split may have dropped some)
        extend = need - (self.end - self.start)
        if extend > self.start or count + n > self._k.shape[0]:
            self._lay_out(count + n, max(extend, 0), 0, "join")
        start = self.start - max(extend, 0)
        if extend > 0 and count:  # the running rows' new leading columns: padding
            self._k[:count, :, start : self.start].zero_()
            self._v[:count, :, start : self.start].zero_()
        theirs = other.kept(other.width)
        keys = other._k[: other.rows, :, other.end - theirs : other.end]
        values = other._v[: other.rows, :, other.end - theirs : other.end]
        if keep is not None and keep != list(range(other.rows)):
            index = torch.tensor(keep, device=keys.device)
            keys, values = keys.index_select(0, index), values.index_select(0, index)
        rows = slice(count, count + n)
        self._k[rows, :, self.end - theirs : self.end].copy_(keys)
        self._v[rows, :, self.end - theirs : self.end].copy_(values)
        self._k[rows, :, start : self.end - theirs].zero_()
        self._v[rows, :, start : self.end - theirs].zero_()
        self.stats.written_bytes += _nbytes(keys) + _nbytes(values)
        self.start, self.rows, self.width = start, count + n, width

    def state(self) -> tuple:
        return self._k, self._v, self.rows, self.start, self.end, self.width, self.is_initialized

    def restore(self, state: tuple) -> None:
        self._k, self._v, self.rows, self.start, self.end, self.width, self.is_initialized = state

    # --- laying out again -----------------------------------------------------------------------------
    def _lay_out(self, rows: int, extend_left: int, append: int, reason: str) -> None:
        """Move the live columns into a new buffer with ``rows`` slots, ``extend_left`` free columns before
        them and room for ``append`` after (and the spare room ``_room`` keeps)."""
        live = self.end - self.start
        span = extend_left + live + append
        slots, left, right = self._room(rows, span, append)
        columns = left + span + right
        keys, values = _empty(self._k, slots, columns), _empty(self._v, slots, columns)
        begin = left + extend_left
        keys[: self.rows, :, begin : begin + live].copy_(self._k[: self.rows, :, self.start : self.end])
        values[: self.rows, :, begin : begin + live].copy_(self._v[: self.rows, :, self.start : self.end])
        self.stats.copied_bytes += self.rows * live * (_row_bytes(keys) + _row_bytes(values))
        self.stats.relayouts += 1
        metrics.ENGINE_KV_RELAYOUTS.labels(reason).inc()
        self._k, self._v = keys, values
        self.start, self.end = begin, begin + live

    def _room(self, rows: int, span: int, append: int) -> tuple[int, int, int]:
        """(slots, free columns on the left, on the right) of a buffer for ``rows`` rows and ``span`` columns,
        ``append`` of them about to be written. Right: the rows' remaining token budgets, or the live columns
        (doubling: appends amortised O(1)); a window's: one window (its columns move back every ~window
        steps). Left: a quarter of the live columns, so a newcomer a little wider than the batch joins
        without a re-layout (a window never needs more than ``window - 1``). Slots: double, up to the batch's
        row bound; down to twice the rows when a quarter or less are used. slots x columns stay within the KV
        budget (spare room shrinks first)."""
        window = self.sliding_window
        if window is not None:
            right, left = max(window, MIN_COLUMNS), max(0, window - 1 - span)
        else:
            right, left = max(self.plan.right, span, MIN_COLUMNS), span // 4
        current = self._k.shape[0] if self.is_initialized else 0
        if rows > current:
            slots = max(rows, min(self.plan.max_rows, max(2 * current, 2 * rows, 4)))
        else:  # a batch that shrank to a quarter of its slots gives the rest back (this copy happens anyway)
            slots = current if 4 * rows > current else max(2 * rows, 4)
        budget = self.plan.budget_tokens
        if window is None and budget is not None and slots * (left + span + right) > budget:
            slots = max(rows, current)  # no spare slots
            spare = max(0, budget // slots - span)
            right = min(right, max(spare, append, MIN_COLUMNS))  # at most one re-layout per MIN_COLUMNS steps
            left = min(left, max(0, spare - right))
        return slots, left, right


class KVCache(Cache):
    """The engine's cache: one ``KVLayer`` per attention layer, sharing the batch's ``Plan`` and ``Stats``."""

    def __init__(self, windows: list[int | None], plan: Plan | None = None) -> None:
        self.plan, self.stats = plan or Plan(), Stats()
        super().__init__(layers=[KVLayer(window, self.plan, self.stats) for window in windows])

    @property
    def kv_layers(self) -> list[KVLayer]:
        return self.layers  # type: ignore[return-value]

    def settle(self) -> None:
        for layer in self.kv_layers:
            layer.settle()

    def roll_back(self, width: int) -> None:
        for layer in self.kv_layers:
            layer.roll_back(width)

    def trim(self, width: int) -> None:
        for layer in self.kv_layers:
            layer.trim(width)

    def select(self, order: list[int]) -> None:
        for layer in self.kv_layers:
            layer.select(order)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select([int(i) for i in indices.tolist()])

    def join(self, other: KVCache, count: int, width: int, keep: list[int] | None = None) -> None:
        """Stack ``other``'s rows (``keep`` of them) under this cache's first ``count``, both fitted to
        ``width`` columns. On an exception (out of memory half-way) every layer is as it was."""
        states = [layer.state() for layer in self.kv_layers]
        try:
            for mine, theirs in zip(self.kv_layers, other.kv_layers, strict=True):
                mine.join(theirs, count, width, keep)
        except Exception:
            for layer, state in zip(self.kv_layers, states):
                layer.restore(state)
            raise


_NONE = torch.empty(0)  # a layer's buffers before its first columns


def _empty(like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    return torch.empty((rows, like.shape[1], columns, like.shape[-1]), dtype=like.dtype, device=like.device)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _row_bytes(buffer: torch.Tensor) -> int:
    """Bytes of one row's column (all heads)."""
    return buffer.shape[1] * buffer.shape[-1] * buffer.element_size()
