"""The decode loop with continuous batching: rows (each with its own adapter, sampling parameters, stops
and budget) join a running batch and leave it between decode steps.

A hand-written loop over the model with a KV cache instead of ``generate()`` because every row differs:
its temperature / top_p / top_k / seed, its stop strings, its token budget, and its arrival time. Newcomers are
prefilled together in one forward into a cache of their own, then their columns are written into free rows of
the running cache (the shorter side is left-padded with masked columns; ``app.engine.kv_cache`` does it for
each kind of layer: full attention and sliding windows, in ``app.engine.kv_store``'s buffers written in
place: a step or a join copies no existing column). Finished rows leave the batch and the cache at once (the
last rows move into their slots), and columns that became padding for every remaining row are let go, so a
short answer never pays for a long neighbour.

A prompt longer than ``prefill_chunk`` tokens may enter instead chunk by chunk (``enter``, then ``advance``
once per scheduler turn, between decode steps) into a cache of its own, and merges like any newcomer after
its last chunk: the running rows keep decoding while it is prefilled, and the row computes what a prefill at
once would (same positions, causal attention over the same tokens).

Positions are counted from each row's first real token, so a padded row computes what it would alone.

A row's failure is that row's alone. Parameters are checked before a row joins (``SamplingParams.check``);
an error while sampling, stopping or detokenizing one row (or logits that are not finite) finishes that row
with its error and the others carry on. When the model call of a whole step or prefill raises (a device
out-of-memory, or an input only one row triggers), it is retried with the batch split in halves, down to a
single row, which alone is failed; rows set aside by a split (``parked``) resume later by recomputing their
prompt and what they generated so far (a prefill), as vLLM's recompute preemption does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from app.engine import kv_cache
from app.engine.detokenize import IncrementalDetokenizer
from app.engine.kv_store import KVCache, Plan
from app.engine.sampling import MAX_TOP_K, make_generator
from app.engine.sampling import choose as choose_tokens
from core.errors import GenerationFailed, InvalidRequest, ServiceError, ServiceUnavailable
from core.requests import SEED_BOUND

log = logging.getLogger(__name__)

# forward(input_ids, attention_mask, position_ids, past_key_values, adapter_names[, all_logits][, side])
#   -> (logits, cache): the last position's logits (rows, vocab), or every position's (rows, columns, vocab)
#   when all_logits is true (the prompt's log-probabilities need them); side: a prefill of rows not (yet) in
#   the batch, whose per-row routing must not replace the running rows' (model_host.ModelHost.forward)
Forward = Callable[..., tuple[torch.Tensor, Any]]

# (token id, its log-probability, the top alternatives as (token id, log-probability), most likely first)
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Log-probabilities (of the model's distribution, before temperature and top_p, as OpenAI and vLLM report
    # them): None = none; k >= 0 = each generated token's, with its k most likely alternatives.
    logprobs: int | None = None
    # The same for every prompt token after the first (OpenAI's echo=true with logprobs).
    prompt_logprobs: int | None = None

    def check(self) -> None:
        """Refuse what sampling cannot take before the row joins a batch, naming the field."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be a positive integer", param="max_new_tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature must be a finite number >= 0", param="temperature")
        if not math.isfinite(self.top_p) or not 0 <= self.top_p <= 1:
            raise InvalidRequest("top_p must be in [0, 1]", param="top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not -1 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequest(f"top_k must be an integer in [-1, {MAX_TOP_K}] (-1 or 0: off)", param="top_k")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < SEED_BOUND):
            raise InvalidRequest("seed must be an integer with 0 <= seed < 2**63", param="seed")
        if any(not isinstance(stop, str) or not stop for stop in self.stop):
            raise InvalidRequest("stop strings must be non-empty strings", param="stop")


@dataclass
class Row:
    """One request's state in a running batch. ``decode`` turns token ids into text (special tokens dropped)."""

    prompt_ids: list[int]
    adapter_slot: str  # the name the adapter has inside the model, or the base marker
    params: SamplingParams
    eos_ids: frozenset[int]
    decode: Callable[[list[int]], str]
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    should_stop: Callable[[], bool] = lambda: False  # e.g. the client went away
    tag: Any = None  # the caller's handle (the engine's request)
    generated: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, if asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first: None), if asked
    text: str = ""
    finish_reason: str | None = None  # stop, length, abort, or error (then ``error`` says why)
    error: BaseException | None = None
    _emitted: int = 0
    _generator: torch.Generator | None = None
    _detokenizer: IncrementalDetokenizer | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This row's seeded random stream (made on first use, then carried across steps), or None."""
        if self._generator is None:
            self._generator = make_generator(self.params, device)
        return self._generator

    def fail(self, exc: BaseException) -> None:
        """Finish this row with an error (reported to its caller only)."""
        if not isinstance(exc, ServiceError):
            log.warning("generation of one row failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        self.error, self.finish_reason = exc, "error"

    @property
    def input_ids(self) -> list[int]:
        """What a prefill of this row feeds: its prompt, plus what it generated if it resumes after a split."""
        return self.prompt_ids + self.generated

    def push(self, token: int) -> None:
        self.generated.append(token)
        if token in self.eos_ids:
            self._finish("stop")
            return
        if self._detokenizer is None:
            self._detokenizer = IncrementalDetokenizer(self.decode)
        # no stop lies wholly inside text[:searched]: earlier steps looked there and it has not changed
        searched = self._detokenizer.update(self.generated)
        self.text = self._detokenizer.text
        cut = _first_stop(self.text, self.params.stop, since=searched)
        if cut is not None:
            self.text = self.text[:cut]
            self._finish("stop")
        elif len(self.generated) >= self.params.max_new_tokens:
            self._finish("length")
        elif self.should_stop():
            self._finish("abort")
        else:
            self._emit(final=False)

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.on_text is None:
            return
        end = len(self.text) if final else _safe_end(self.text, self.params.stop)
        if end > self._emitted:
            piece, self._emitted = self.text[self._emitted : end], end
            self.on_text(piece)


def _first_stop(text: str, stops: Sequence[str], since: int = 0) -> int | None:
    """Where the earliest stop string starts in ``text``, given that none lies wholly inside ``text[:since]``:
    only the new text and the longest stop's tail before it are searched."""
    if not stops:
        return None
    start = max(0, since - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be streamed: not a tail that may still grow into a stop string, nor a
    half-decoded multi-byte character (shown as U+FFFD until its last byte arrives)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    # after the partial character: "世" then half of "界" must not stream "世" when "世界" is a stop
    shown = end
    for stop in stops:
        for k in range(min(len(stop) - 1, shown), 0, -1):
            if text.startswith(stop[:k], shown - k):
                end = min(end, shown - k)
                break
    return end


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, longest - len(prompt) :] = 1
    return ids, mask


class RunningBatch:
    """Rows decoding together over one KV cache. Only the engine's model thread uses it."""

    def __init__(
        self,
        forward: Forward,
        pad_id: int,
        device: torch.device,
        joins: bool = True,
        prefill_chunk: int = 0,
        *,
        windows: list[int | None] | None = None,
        max_rows: int = 16,
        budget_tokens: int | None = None,
    ) -> None:
        self.forward, self.pad_id, self.device = forward, pad_id, device
        # each attention layer's sliding window (None: full attention) for ``KVCache``; None: the model makes its
        # own cache (a kind ``kv_cache`` cannot merge: drain mode)
        self.windows = windows
        self.max_rows, self.budget_tokens = max_rows, budget_tokens
        self.joins = joins  # False: the model's cache cannot take rows in mid-flight (``kv_cache.join_mode``)
        self.prefill_chunk = prefill_chunk  # 0: every prompt is prefilled in one forward
        self.entering: Row | None = None  # a long prompt being prefilled chunk by chunk (``enter``, ``advance``)
        self._entering_cache: Any = None  # its own cache, merged into the batch's when its prompt is in
        self._entered = 0  # its tokens already in that cache
        self.chunks = 0  # chunks prefilled (tests, metrics)
        self.rows: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (rows, cached columns): 1 where the column is a real token
        self._last_pos: torch.Tensor | None = None  # (rows, 1): position of each row's last fed token
        self._next: list[int] = []  # the token each row feeds at the next step
        self.parked: list[Row] = []  # set aside by a failed prefill or step; resumed by recomputation
        self._room_at_park = 0  # rows running when the last ones were parked: they resume below that
        self.split_retries = {"prefill": 0, "step": 0}  # forwards retried split (tests, logs)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def accepts_joins(self) -> bool:
        """Newcomers can merge into the running cache (else they wait until the batch drains)."""
        if not self.rows:
            return True
        if self.joins and kv_cache.layers(self._cache) is None:  # a cache unlike what the model's config said
            self.joins = False
            kinds = sorted({type(layer).__name__ for layer in getattr(self._cache, "layers", ())})
            kv_cache.announce(kv_cache.DRAIN, f"its cache is made of {', '.join(kinds) or type(self._cache).__name__}")
        return self.joins

    def add(self, rows: list[Row]) -> list[Row]:
        """Prefill ``rows`` in one forward (each row's next token comes from it) and merge them into the
        batch. Returns the rows that finished meanwhile: on that first token, or failed. If the prefill
        raises, it is retried with ``rows`` split in halves; a row is failed only alone, except that one out
        of device memory next to running rows is parked until they leave."""
        try:
            self._prefill(rows)
        except Exception as exc:  # noqa: BLE001 - retried split; the running rows are untouched
            done, pending = [r for r in rows if r.finished], [r for r in rows if not r.finished]
            _release_device_memory(exc)
            log.warning("prefill of %d rows failed (%s: %s); retrying them split", len(rows), type(exc).__name__, exc)
            self.split_retries["prefill"] += 1
            if len(pending) > 1:
                half = len(pending) // 2
                return done + self.add(pending[:half]) + self.add(pending[half:])
            if pending and _out_of_memory(exc) and self.rows:
                self._park(pending)
            elif pending:
                pending[0].fail(row_error(exc))
                done += pending
            return done
        return [r for r in rows if r.finished]

    def step(self) -> list[Row]:
        """One decode step for every row. Returns the rows that finished (already out of the batch)."""
        running_mask, last_pos = self._state()
        try:
            ids = torch.tensor(self._next, dtype=torch.long, device=self.device).unsqueeze(1)
            mask = torch.cat([running_mask, running_mask.new_ones((len(self.rows), 1))], dim=1)
            positions = last_pos + 1
            logits, self._cache = self.forward(ids, mask, positions, self._cache, [r.adapter_slot for r in self.rows])
        except Exception as exc:  # noqa: BLE001 - retried split (see _step_failed)
            return self._step_failed(exc)
        self._mask, self._last_pos = mask, positions
        kv_cache.settle(self._cache)
        self._next = self._push(self.rows, logits)
        return self._drop_finished()

    def chunked(self, row: Row) -> bool:
        """Whether ``row`` enters in chunks (``enter``): its prompt is longer than a chunk, rows can join, and
        it does not ask for its prompt's log-probabilities (they need every position's logits at once)."""
        return (
            self.prefill_chunk > 0
            and self.joins
            and len(row.input_ids) > self.prefill_chunk
            and row.params.prompt_logprobs is None
        )

    def enter(self, row: Row) -> None:
        """Start prefilling ``row`` chunk by chunk: ``advance`` feeds one chunk, between decode steps."""
        assert self.entering is None, "one row enters at a time"
        # its own cache reserves the whole prompt: the chunks are written in place, one after the other
        plan = Plan(right=max(0, len(row.input_ids) - self.prefill_chunk))
        self.entering, self._entering_cache, self._entered = row, kv_cache.new_cache(self.windows, plan), 0

    def advance(self) -> list[Row]:
        """Prefill the entering row's next chunk into its own cache (the running rows are untouched). After its
        last chunk its first token is chosen and it merges into the batch like any newcomer. Returns the row if
        it finished meanwhile (on that first token, abandoned, or failed); out of device memory next to running
        rows it is parked instead, and resumes by recomputation when they leave."""
        row = self.entering
        if row is None:
            return []
        if row.should_stop():
            self._stop_entering()
            row.finish_reason = "abort"
            return [row]
        prompt = row.input_ids
        end = min(self._entered + self.prefill_chunk, len(prompt))
        try:
            ids = torch.tensor([prompt[self._entered : end]], dtype=torch.long, device=self.device)
            mask = torch.ones((1, end), dtype=torch.long, device=self.device)
            positions = torch.arange(self._entered, end, dtype=torch.long, device=self.device).unsqueeze(0)
            logits, self._entering_cache = self.forward(
                ids, mask, positions, self._entering_cache, [row.adapter_slot], side=True
            )
            kv_cache.settle(self._entering_cache)  # a window keeps only its last columns between chunks
            self.chunks += 1
            self._entered = end
            if end < len(prompt):
                return []
            cache = self._entering_cache
            self._stop_entering()
            tokens = self._push([row], logits)
            if not row.finished:
                self._merge([row], cache, mask, positions[:, -1:], tokens)
        except Exception as exc:  # noqa: BLE001 - the entering row's alone; the running rows carry on
            self._stop_entering()
            _release_device_memory(exc)
            log.warning("chunked prefill of one row failed (%s: %s)", type(exc).__name__, exc)
            if row.finished:
                return [row]
            if _out_of_memory(exc) and self.rows:
                self._park([row])
                return []
            row.fail(row_error(exc))
            return [row]
        return [row] if row.finished else []

    def _stop_entering(self) -> None:
        self.entering, self._entering_cache, self._entered = None, None, 0

    def resume(self) -> list[Row]:
        """Prefill the parked rows again once there is more room than when they were parked (or none runs).
        Returns the rows that finished (see ``add``)."""
        if not self.parked or not self.accepts_joins or (self.rows and len(self.rows) >= self._room_at_park):
            return []
        rows, self.parked = self.parked, []
        return self.add(rows)

    def clear(self) -> list[Row]:
        rows, self.rows = self.rows, []
        self._cache = self._mask = self._last_pos = None
        self._next = []
        return rows

    # --- internals -------------------------------------------------------------------------------------
    def _prefill(self, rows: list[Row]) -> None:
        """``add`` without the retry: on an exception the batch is as before (the merge undoes itself)."""
        ids, mask = left_pad([r.input_ids for r in rows], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        slots = [r.adapter_slot for r in rows]
        # The prompt's log-probabilities come from a row's first prefill (a resumed row has them already).
        scored = [r.params.prompt_logprobs is not None and r.prompt_logprobs is None and not r.generated for r in rows]
        if any(scored):
            logits, cache = self.forward(
                ids, mask, positions, kv_cache.new_cache(self.windows), slots, all_logits=True, side=True
            )
            for j, row in enumerate(rows):
                top = row.params.prompt_logprobs
                if scored[j] and top is not None:  # (scored implies it is set)
                    row.prompt_logprobs = _prompt_logprobs(logits[j], row.prompt_ids, top)
            logits = logits[:, -1, :]
        else:
            logits, cache = self.forward(ids, mask, positions, kv_cache.new_cache(self.windows), slots, side=True)
        tokens = self._push(rows, logits)
        keep = [j for j, r in enumerate(rows) if not r.finished]
        if len(keep) < len(rows) and keep:
            index = torch.tensor(keep, device=self.device)
            mask, positions = mask.index_select(0, index), positions.index_select(0, index)
            if not isinstance(cache, KVCache):  # ours takes only the kept rows' columns when it merges them
                cache.batch_select_indices(index)
        if keep:
            subset = keep if len(keep) < len(rows) else None
            self._merge([rows[j] for j in keep], cache, mask, positions[:, -1:], [tokens[j] for j in keep], subset)

    def _push(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Each row's next token, pushed to it. The tokens of the whole batch are chosen together and come to
        the host in one transfer (``app.engine.sampling``; a sync per row per step would dominate on a GPU),
        with whether each row's logits are finite. An error here is its row's alone."""
        choices = choose_tokens(logits, [r.params for r in rows], [r.generator(logits.device) for r in rows])
        tokens = []
        for j, row in enumerate(rows):
            try:
                if not choices.finite[j]:
                    raise GenerationFailed(
                        "the model produced non-finite logits (NaN or infinity) for this request; "
                        "its adapter's weights may be corrupt",
                        code="non_finite_logits",
                    )
                error = choices.errors[j]
                if error is not None:
                    raise error
                token = choices.tokens[j]
                if row.params.logprobs is not None:
                    row.token_logprobs.append(
                        _token_logprob(torch.log_softmax(logits[j].float(), dim=-1), token, row.params.logprobs)
                    )
                row.push(token)
            except Exception as exc:  # noqa: BLE001 - this row's failure; its neighbours keep generating
                row.fail(exc)
                token = self.pad_id
            tokens.append(token)
        return tokens

    def _step_failed(self, exc: Exception) -> list[Row]:
        """A step's forward raised: cut the cache back to before it, set the second half of the rows aside
        (parked, resumed later by recomputation) and retry with the first; a row alone is failed."""
        _release_device_memory(exc)
        log.warning(
            "decode step of %d rows failed (%s: %s); retrying it split", len(self.rows), type(exc).__name__, exc
        )
        self.split_retries["step"] += 1
        if len(self.rows) == 1:
            (row,) = self.clear()
            row.fail(row_error(exc))
            return [row]
        if not self._roll_back():  # a cache that cannot be cut back: every row resumes by recomputation
            self._park(self.clear())
            return []
        half = len(self.rows) // 2
        parked = self.rows[half:]
        self._select(list(range(half)))
        self._park(parked)
        return self.step()

    def _park(self, rows: list[Row]) -> None:
        self.parked.extend(rows)
        self._room_at_park = len(self.rows)

    def _roll_back(self) -> bool:
        """Drop the column a failed step appended to the layers it reached. False if the cache is not made
        of layers ``kv_cache`` knows (then it cannot be trusted)."""
        return kv_cache.roll_back(self._cache, self._state()[0].shape[1])

    def _merge(
        self,
        rows: list[Row],
        cache: Any,
        mask: torch.Tensor,
        last_pos: torch.Tensor,
        tokens: list[int],
        subset: list[int] | None = None,
    ) -> None:
        """Take ``rows`` (prefilled into ``cache``: its rows ``subset``, or all) into the batch. Ours: their
        columns are written into the batch's cache (a cache of its own when the batch was empty). Another
        kind (drain mode: no row runs) becomes the batch's as it is."""
        if not isinstance(cache, KVCache):
            assert not self.rows, "a cache kv_cache cannot merge takes no newcomer while rows run"
            self.rows, self._cache, self._mask, self._last_pos, self._next = rows, cache, mask, last_pos, tokens
            return
        if not self.rows:
            self._cache, self._mask, self._last_pos = None, mask[:0, :0], last_pos[:0]
        target = self._cache
        if target is None:
            target = KVCache(self.windows or [], Plan(max_rows=self.max_rows, budget_tokens=self.budget_tokens))
        target.plan.right = _remaining(self.rows + rows)
        running_mask, running_last = self._state()
        width = max(running_mask.shape[1], mask.shape[1])
        merged_mask = torch.cat([_pad_mask(running_mask, width), _pad_mask(mask, width)], dim=0)
        merged_last = torch.cat([running_last, last_pos], dim=0)
        # the newcomers' columns into free rows, left-padded to the merged width (undone on an exception)
        target.join(cache, len(self.rows), width, subset)
        self._cache, self._mask, self._last_pos = target, merged_mask, merged_last
        self.rows, self._next = self.rows + rows, self._next + tokens

    def _drop_finished(self) -> list[Row]:
        keep = [j for j, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return []
        done = [r for r in self.rows if r.finished]
        if not keep:
            self.clear()
            return done
        self._select(keep)
        return done

    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (ascending indices into ``rows``) in the batch and its cache. The last rows
        move into the slots of rows that left, so only they are copied (the batch's row order changes)."""
        order = _fill_order(keep)
        index = torch.tensor(order, device=self.device)
        kv_cache.select(self._cache, order, self.device)
        mask, last_pos = self._state()
        self._mask, self._last_pos = mask.index_select(0, index), last_pos.index_select(0, index)
        self.rows, self._next = [self.rows[j] for j in order], [self._next[j] for j in order]
        if isinstance(self._cache, KVCache):
            self._cache.plan.right = _remaining(self.rows)
        self._trim()

    def _trim(self) -> None:
        """Cut leading columns that are padding for every remaining row (left by a long row that left)."""
        if kv_cache.layers(self._cache) is None:
            return
        mask = self._state()[0]
        first = int(mask.any(dim=0).int().argmax())
        if first > 0:
            self._mask = mask[:, first:]
            kv_cache.trim(self._cache, self._mask.shape[1])

    def _state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running rows' mask and last positions: set from the first merge until ``clear``."""
        assert self._mask is not None and self._last_pos is not None, "no row runs"
        return self._mask, self._last_pos


def _fill_order(keep: list[int]) -> list[int]:
    """The rows ``keep`` (ascending) as slots ``0..len(keep)-1``: rows already there stay, the last ones fill
    the slots of rows that left."""
    n, kept = len(keep), set(keep)
    order = list(range(n))
    holes = [i for i in range(n) if i not in kept]
    for hole, row in zip(holes, [j for j in keep if j >= n]):
        order[hole] = row
    return order


def _remaining(rows: list[Row]) -> int:
    """Columns the rows may still append: the most tokens one of them may still generate."""
    return max((r.params.max_new_tokens - len(r.generated) for r in rows), default=0)


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry in one position's log-probabilities (vocab,), with the ``top`` most likely."""
    alternatives = []
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return token, float(logprobs[token]), alternatives


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it. ``logits`` (columns, vocab) is the
    row's prefill output, left-padded: the prompt fills its last ``len(prompt)`` columns."""
    start = logits.shape[0] - len(prompt)
    predicted = torch.log_softmax(logits[start : start + len(prompt) - 1].float(), dim=-1)  # predicts tokens 1..
    return [None] + [_token_logprob(predicted[i], token, top) for i, token in enumerate(prompt[1:])]


def row_error(exc: BaseException) -> ServiceError:
    """What the caller of a failed row is told: the error itself if it is one of ours, else its cause named."""
    if isinstance(exc, ServiceError):
        return exc
    if _out_of_memory(exc):
        return ServiceUnavailable(
            "the device ran out of memory generating this request, even alone in its batch; "
            "retry, or ask for fewer tokens",
            code="device_out_of_memory",
        )
    return GenerationFailed(f"generating this request failed: {type(exc).__name__}: {str(exc)[:200]}")


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def _release_device_memory(exc: BaseException) -> None:
    """After a device OOM, hand cached blocks back so the split retry gets the memory the failed call freed."""
    if _out_of_memory(exc) and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return mask if mask.shape[1] == width else F.pad(mask, (width - mask.shape[1], 0))
