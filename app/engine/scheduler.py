"""The model thread's side of the inference engine (``app.engine.engine``): its scheduler loop.

The model thread runs a scheduler loop: take what arrived, admit what is ready into the running batch
(``RunningBatch``: prefill the newcomers, merge their KV cache into the running one), run one decode step,
answer the rows that finished. Rows join and leave between steps (continuous batching) *whatever their
adapters*: every row names its adapter and the Bone layers select per row in a single forward. When the
engine is idle, the first request waits up to ``batch_wait_ms`` for company, so a burst is prefilled at once.

Admission is bounded twice: by rows (``max_batch_size``) and by KV cache tokens (``kv_budget_tokens``): each
admitted row reserves its prompt + ``max_new_tokens`` until it is answered, and a request that does not fit
waits in the queue (those behind it wait too, so a large request is not starved by small ones). A prompt
longer than ``prefill_chunk`` enters chunk by chunk, one chunk per loop turn before the decode step
(``RunningBatch.enter`` / ``advance``), so the running rows keep streaming while it is prefilled.

A request whose adapter is not resident waits without holding anyone up: the ``AdapterLoader`` threads read
and verify it, and only the final copy into the model (``AdapterCache.install``) runs here, between steps.

One request never fails another: a row's error is answered to its caller alone (``app.engine.batch``), and
rows a failed step set aside (``RunningBatch.parked``) resume before any newcomer is admitted. Admission takes
the waiting requests of keys with the fewest running rows first, so one key's backlog does not hold the
batch slots while another key waits, and a key at its share of the rows or of the KV budget gets no new row
while another key under its share waits (``app.engine.share``: a key alone may still fill the batch).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from app import metrics
from app.engine.adapter_pool import AdapterCache, AdapterLoader, fetch_mix
from app.engine.batch import Row, RunningBatch, row_error
from app.engine.messages import STOP, Control, GenerationResult, Loaded, Request
from app.engine.model_host import ModelHost
from app.engine.share import Holdings, kv_tokens
from core.errors import RateLimited, ServiceError, ServiceUnavailable
from core.names import BASE_ADAPTER
from core.settings import Settings

log = logging.getLogger(__name__)


class NotReady(enum.Enum):
    """Why a waiting request cannot join the batch now."""

    WAIT = "wait"  # its adapter is loading, or there is no room for it while other rows run
    FAILED = "failed"  # its adapter cannot be installed: the request has been answered with the error


class Scheduler:
    """The model thread and everything it owns: the inbox, the waiting requests and their queue bounds, the
    adapter loader, the counters. It works on the running batch, the adapter pool and the model host that
    ``InferenceEngine`` sets up; only ``enqueue``, ``run_between_steps``, ``start`` and ``stop`` are called
    from other threads."""

    def __init__(
        self,
        settings: Settings,
        host: ModelHost,
        cache: AdapterCache,
        batch: RunningBatch,
        *,
        eos_ids: frozenset[int],
        decode: Callable[[list[int]], str],
        out_features: dict[str, int],
    ) -> None:
        self.settings, self.host, self.cache, self.batch = settings, host, cache, batch
        # InferenceEngine resolves both bounds (from the device when unset) before it builds the scheduler
        assert settings.max_batch_size is not None and settings.kv_budget_tokens is not None
        self.max_rows, self.kv_budget = settings.max_batch_size, settings.kv_budget_tokens
        self.eos_ids = eos_ids
        self._decode = decode  # token ids -> text, for the streamed pieces of each row
        self._out_features = out_features
        self._inbox: queue.Queue = queue.Queue()
        self.loader = AdapterLoader(cache.registry, lambda name, f, e: self._inbox.put(Loaded(name, f, e)))
        self._waiting: deque[Request] = deque()  # model thread only
        self._pending = 0  # submitted, not yet admitted or answered: what max_queue bounds
        self._pending_by_key: dict[str, int] = {}  # ... per key: what max_queue_per_key bounds
        self._pending_lock = threading.Lock()
        self._preload = list(dict.fromkeys([*settings.adapter_preload, *settings.adapter_pin]))
        self.thread: threading.Thread | None = None
        # Counters for tests and benchmarks (Prometheus has the same figures, process-wide).
        self.prefills = self.joins = self.steps = self.aborted = self.hits = self.misses = self.failed_rows = 0
        self.share_deferrals = 0
        self._tps_window = [time.perf_counter(), 0]

    # --- called from other threads --------------------------------------------------------------------
    def start(self) -> None:
        for name in self._preload:
            self.loader.fetch(name)  # installed by the model thread when read (see _on_loaded)
        self.thread = threading.Thread(target=self._serve_forever, name="inference-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.thread is not None and self.thread.is_alive():
            self._inbox.put(STOP)
            self.thread.join(timeout)
        self.loader.close()

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    def enqueue(self, request: Request) -> None:
        """Queue a request whose bounds the engine has checked, if the queue (and the key's share of it) has room."""
        key, share = request.key, self.settings.queue_share
        with self._pending_lock:
            if self._pending >= self.settings.max_queue:
                raise RateLimited(
                    f"{self._pending} generation requests are waiting for a batch slot "
                    f"(BONE_MAX_QUEUE={self.settings.max_queue}); retry shortly",
                    retry_after=1.0,
                    code="engine_busy",
                )
            mine = self._pending_by_key.get(key, 0) if key is not None else 0
            if key is not None and mine >= share:
                raise RateLimited(
                    f"this key has {mine} generation requests waiting for a batch slot; one key may hold "
                    f"at most {share} of the {self.settings.max_queue} queue places (BONE_MAX_QUEUE_PER_KEY); "
                    "retry when some have finished",
                    retry_after=1.0,
                    code="key_queue_full",
                )
            self._pending += 1
            if key is not None:
                self._pending_by_key[key] = mine + 1
        self._inbox.put(request)

    def run_between_steps(self, action: Callable[[], object]) -> None:
        """Run ``action`` on the model thread between two steps (e.g. evicting a deleted adapter)."""
        self._inbox.put(Control(action))

    def in_use(self) -> set[str]:
        """The slots of running and parked rows (parked rows resume on theirs): never evicted."""
        return {row.adapter_slot for row in self._admitted()}

    def _admitted(self) -> list[Row]:
        """Every row admitted and not answered: running, parked, or entering (its prompt half prefilled)."""
        entering = [self.batch.entering] if self.batch.entering is not None else []
        return self.batch.rows + self.batch.parked + entering

    def kv_reserved(self) -> int:
        """KV cache tokens the admitted rows have reserved (``BONE_KV_BUDGET_TOKENS`` bounds their sum)."""
        return sum(kv_tokens(row.tag) for row in self._admitted())

    # --- the model thread -----------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            if not self._receive():
                break
            self._admit()
            if self.batch.entering is not None:
                self._advance()
            if self.batch.rows:
                self._step()
            metrics.ENGINE_KV_TOKENS_RESERVED.set(self.kv_reserved())
        entering = [self.batch.entering] if self.batch.entering is not None else []
        for row in self.batch.clear() + self.batch.parked + entering:
            row.tag.future.set_exception(ServiceUnavailable("the server is shutting down", code="shutting_down"))
        while self._waiting:
            self._fail(self._waiting.popleft(), ServiceUnavailable("the server is shutting down", code="shutting_down"))

    def _receive(self) -> bool:
        """Take what arrived. Busy: never wait. Idle: block until a request comes, then gather for up to
        ``batch_wait_ms`` (or until a full batch waits). Returns False on stop."""
        idle = not self.batch.rows and not self.batch.parked and self.batch.entering is None
        deadline = None
        timeout: float | None
        while True:
            if not idle:
                timeout = 0.0
            elif deadline is None:
                timeout = 0.05 if self._waiting else None  # waiting on loads or room: poll for abandoned ones
            else:
                timeout = max(0.0, deadline - time.monotonic())
            try:
                item = self._inbox.get(timeout=timeout) if timeout != 0.0 else self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is STOP:
                return False
            if isinstance(item, Request):
                self._waiting.append(item)
                self._prefetch(item)
                if idle and deadline is None:
                    deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
                if len(self._waiting) >= self.max_rows:
                    idle = False  # a full batch is here: drain the rest without waiting
            elif isinstance(item, Loaded):
                self._on_loaded(item)
                if idle and deadline is None:
                    return True
            else:
                try:
                    item.action()
                except Exception:  # noqa: BLE001 - housekeeping must never kill the model thread
                    log.exception("engine control action failed")

    def _on_loaded(self, item: Loaded) -> None:
        self.loader.finished(item.name)
        users = [r for r in self._waiting if r.adapter == item.name and r.fetched is None]
        if item.error is not None:
            if not isinstance(item.error, ServiceError):
                log.error("loading adapter %r failed: %s", item.name, item.error)
            for request in users:
                self._waiting.remove(request)
                self._fail(request, item.error)
            return
        fetched = item.fetched
        assert fetched is not None  # a load ends with its adapter or with its error
        self.cache.cpu_put(fetched)
        for request in users:  # an older sha still in the CPU tier keeps it; else the version just read
            if request.sha256 == fetched.sha256 or self.cache.cpu_get((item.name, request.sha256 or "")) is None:
                request.fetched = fetched
        if item.name in self._preload and not users:
            try:
                self.cache.install(fetched, self.in_use())
            except Exception:  # noqa: BLE001 - a broken preload must not stop serving
                log.exception("preloading adapter %r failed", item.name)

    def _admit(self) -> None:
        if self.batch.parked:
            for row in self.batch.resume():
                self._answer(row)
            if self.batch.parked:
                return  # short of device memory: newcomers wait until the parked rows are back in
        if not self._waiting or not self.batch.accepts_joins:
            return
        room = self.max_rows - len(self.batch.rows) - (self.batch.entering is not None)
        in_use, chosen, still = self.in_use(), list[Row](), deque[Request]()
        reserved = self.kv_reserved()
        entering: Row | None = None
        over_budget = False  # once one request waits for KV room, later ones wait too: a long one is not starved
        shares = Holdings(
            (row.tag for row in self._admitted()), self._waiting, self.settings.running_share, self.settings.kv_share
        )
        for request in self._fair_order():
            if request.future.cancelled():  # the caller gave up (timeout, disconnect) while it waited
                self._release(request)
                shares.left(request)
                continue
            if shares.deferred(request):  # its key holds its share and another key waits: the room is theirs
                self._defer(request)
                still.append(request)
                continue
            row = self._row(request)
            chunked = self.batch.chunked(row)
            over_budget = over_budget or reserved + kv_tokens(request) > self.kv_budget
            fits = (
                len(chosen) + (entering is not None) < room
                and not over_budget
                and not (chunked and (self.batch.entering is not None or entering is not None))
            )
            progressing = self.batch.rows or chosen or entering is not None or self.batch.entering is not None
            slot = self._resolve(request, in_use, must_progress=not progressing) if fits else NotReady.WAIT
            if slot is NotReady.FAILED:
                shares.left(request)
                continue
            if slot is NotReady.WAIT:
                still.append(request)
                continue
            if not request.future.set_running_or_notify_cancel():
                self._release(request)
                shares.left(request)
                continue
            shares.admitted(request)
            in_use.add(slot)
            row.adapter_slot = slot
            reserved += kv_tokens(request)
            if chunked:
                entering = row
            else:
                chosen.append(row)
        self._waiting = still
        if entering is not None:
            self._release(entering.tag)
            self.batch.enter(entering)  # its chunks run between steps (``_advance``)
        if not chosen:
            return
        self.prefills += 1
        self.joins += bool(self.batch.rows)
        for row in chosen:
            self._release(row.tag)
        try:
            done = self.batch.add(chosen)
        except Exception as exc:  # noqa: BLE001 - reported to the newcomers; the running rows carry on
            log.exception("prefill of %d rows failed", len(chosen))
            for row in chosen:
                row.tag.future.set_exception(exc)
            return
        now = time.perf_counter()
        for row in chosen:
            metrics.TIME_TO_FIRST_TOKEN.observe(now - row.tag.arrived)
        self._count_tokens(len(chosen))
        for row in done:
            self._answer(row)

    def _defer(self, request: Request) -> None:
        if not request.deferred:  # counted once, not at every step it waits
            request.deferred = True
            self.share_deferrals += 1
            metrics.SHARE_DEFERRALS.inc()

    def _row(self, request: Request) -> Row:
        """The row ``request`` becomes in the batch (its adapter slot is set once it is resolved)."""
        return Row(
            prompt_ids=request.prompt_ids,
            adapter_slot=BASE_ADAPTER,
            params=request.params,
            eos_ids=self.eos_ids,
            decode=self._decode,
            on_text=request.on_text,
            should_stop=request.abandoned.is_set,
            tag=request,
        )

    def _advance(self) -> None:
        """One chunk of the entering row's prompt; when it is in, the row has joined the batch (or finished)."""
        row = self.batch.entering
        assert row is not None
        joining = bool(self.batch.rows)
        done = self.batch.advance()
        metrics.PREFILL_CHUNKS.inc()
        if self.batch.entering is None:
            metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - row.tag.arrived)
            self.prefills += 1
            self.joins += joining
            if row in self.batch.rows:
                self._count_tokens(1)
        for finished in done:
            self._answer(finished)

    def _fair_order(self) -> list[Request]:
        """The waiting requests, those of keys with the fewest running rows first (in arrival order within a key
        and among keys with as many)."""
        running: dict[str | None, int] = {}
        for row in self.batch.rows:
            running[row.tag.key] = running.get(row.tag.key, 0) + 1
        return sorted(self._waiting, key=lambda request: running.get(request.key, 0))

    def _resolve(self, request: Request, in_use: set[str], must_progress: bool) -> str | NotReady:
        """The request's slot in the model, or why it cannot join the batch now."""
        if request.adapter is None:
            return BASE_ADAPTER
        key = (request.adapter, request.sha256 or "")
        slot = self.cache.resident(key)
        if not request.counted:
            request.counted = True
            self.hits += slot is not None
            self.misses += slot is None
            (metrics.ADAPTER_CACHE_HITS if slot is not None else metrics.ADAPTER_CACHE_MISSES).inc()
        if slot is not None:
            return slot
        fetched = request.fetched or self.cache.cpu_get(key)
        if fetched is None:
            self._fetch(request)
            return NotReady.WAIT
        if not must_progress and not self.cache.has_room(self.cache.device_bytes(fetched), in_use):
            return NotReady.WAIT  # joins when running rows free their adapters
        try:
            return self.cache.install(fetched, in_use)
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint, an unservable adapter
            if not isinstance(exc, ServiceError):
                log.exception("installing adapter %r failed", request.adapter)
            self._fail(request, exc)
            return NotReady.FAILED

    def _prefetch(self, request: Request) -> None:
        """Start reading a cold adapter as soon as its request arrives, not when it reaches the head of the
        queue: the read (registry, sha256, parsing) overlaps the request's wait for a batch slot."""
        if request.adapter is not None and not self.cache.holds((request.adapter, request.sha256 or "")):
            self._fetch(request)

    def _fetch(self, request: Request) -> None:
        assert request.adapter is not None
        if request.mix is None:
            self.loader.fetch(request.adapter)
        else:
            mix, registry = request.mix, self.cache.registry
            self.loader.fetch(request.adapter, lambda: fetch_mix(registry, mix, self._out_features))

    def _step(self) -> None:
        rows = len(self.batch.rows)
        started = time.perf_counter()
        try:
            done = self.batch.step()
        except Exception as exc:  # noqa: BLE001 - reported to every row of the batch, the thread lives on
            log.exception("decode step of %d rows failed", rows)
            for row in self.batch.clear():
                row.tag.future.set_exception(exc)
            self.host.end_batch()
            return
        self.steps += 1
        metrics.BATCH_SIZE.observe(rows)
        metrics.observe_step(rows, time.perf_counter() - started)  # the step ends on a host copy: a device sync
        self._count_tokens(rows)
        for row in done:
            self._answer(row)
        if done:
            self.cache.shrink(self.in_use())
        if not self.batch.rows:
            self.host.end_batch()

    def _answer(self, row: Row) -> None:
        request: Request = row.tag
        if row.error is not None:
            self.failed_rows += 1
            request.future.set_exception(row_error(row.error))
            return
        self.aborted += row.finish_reason == "abort"
        metrics.GENERATED_TOKENS.labels("adapter" if request.adapter else "base").inc(len(row.generated))
        mix = None if request.mix is None else {name: weight for name, _, weight in request.mix}
        request.future.set_result(
            GenerationResult(
                text=row.text,
                finish_reason=row.finish_reason or "length",
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=len(row.generated),
                adapter=None if mix else request.adapter,
                adapters=mix,
                token_ids=list(row.generated),
                token_logprobs=row.token_logprobs if row.params.logprobs is not None else None,
                prompt_logprobs=row.prompt_logprobs,
            )
        )

    def _count_tokens(self, n: int) -> None:
        """tokens/s over windows of at least half a second (a single step is too noisy to export)."""
        window = self._tps_window
        window[1] += n
        elapsed = time.perf_counter() - window[0]
        if elapsed >= 0.5:
            metrics.GENERATION_TOKENS_PER_S.set(window[1] / elapsed)
            window[0], window[1] = time.perf_counter(), 0

    def _fail(self, request: Request, exc: BaseException) -> None:
        self._release(request)
        if request.future.set_running_or_notify_cancel():
            request.future.set_exception(exc)

    def _release(self, request: Request) -> None:
        """``request`` no longer waits (admitted, answered or given up): it leaves the queue bounds."""
        with self._pending_lock:
            self._pending -= 1
            if request.key is not None:
                left = self._pending_by_key.get(request.key, 0) - 1
                if left > 0:
                    self._pending_by_key[request.key] = left
                else:
                    self._pending_by_key.pop(request.key, None)
