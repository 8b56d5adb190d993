"""The inference engine: one thread owns the base model; async handlers submit requests and await futures.

The model thread runs a scheduler loop: take what arrived, admit what is ready into the running batch
(``RunningBatch``: prefill the newcomers, merge their KV cache into the running one), run one decode step,
answer the rows that finished. Rows join and leave between steps (continuous batching) *whatever their
adapters*: every row names its adapter and the Bone layers select per row in a single forward. When the
engine is idle, the first request waits up to ``batch_wait_ms`` for company, so a burst is prefilled at once.

A request may also name a *mix* of Bone adapters (``{"a": 0.7, "b": 0.3}``): a virtual adapter whose blocks
are the exact weighted sum of the sources', built by the loader from the registry, never written back, and
held in the adapter pool like any adapter (see ``app.adapter_cache``); its rows batch with everything else.

A request whose adapter is not resident waits without holding anyone up: the ``AdapterLoader`` threads read
and verify it, and only the final copy into the model (``AdapterCache.install``) runs here, between steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from app import metrics
from app.adapter_cache import AdapterCache, AdapterLoader, FetchedAdapter, Mix, fetch_mix, mix_name, mix_sha256
from app.decoding import Row, RunningBatch, SamplingParams
from app.model_host import BASE_SLOT, ModelHost
from core.base_model import LoadedBaseModel
from core.errors import InvalidRequest, RateLimited, ServiceError, ServiceUnavailable
from core.registry import AdapterRegistry
from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None
    adapters: dict[str, float] | None = None  # the mix served, if the request named one


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    adapter: str | None
    sha256: str | None
    params: SamplingParams
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    on_text: Callable[[str], None] | None = None
    abandoned: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    fetched: FetchedAdapter | None = None  # its adapter, read by the loader, waiting to be installed
    counted: bool = False  # cache hit/miss recorded
    mix: Mix | None = None  # a mix of adapters: ``adapter`` / ``sha256`` are then the mix's cache key


@dataclass
class _Control:
    """Work for the model thread between steps (e.g. evicting a deleted adapter)."""

    action: Callable[[], Any]


@dataclass
class _Loaded:
    name: str
    fetched: FetchedAdapter | None
    error: BaseException | None


_STOP = object()


class InferenceEngine:
    def __init__(self, base: LoadedBaseModel, registry: AdapterRegistry, settings: Settings) -> None:
        self.base, self.settings = base, settings
        self.tokenizer = base.tokenizer
        self.host = ModelHost(base.model)
        self.cache = AdapterCache(registry, self.host, max_count=settings.adapter_cache_size,
                                  max_bytes=settings.adapter_cache_bytes, cpu_bytes=settings.adapter_cpu_cache_bytes,
                                  device=base.device, pinned=settings.adapter_pin)
        self._inbox: queue.Queue = queue.Queue()
        self.loader = AdapterLoader(registry, lambda name, f, e: self._inbox.put(_Loaded(name, f, e)))
        self._waiting: deque[_Request] = deque()  # model thread only
        self._pending = 0  # submitted, not yet admitted or answered: what max_queue bounds
        self._pending_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers refuse concurrent use ("Already borrowed")
        self._thread: threading.Thread | None = None
        self.eos_ids = _eos_ids(base)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.max_positions = getattr(base.model.config, "max_position_embeddings", None)
        # out_features per module path: mixes of MiSS-mini adapters tile their blocks to (r, out)
        self._out_features = {path: int(getattr(m, "out_features", None) or m.weight.shape[-1])
                              for path, m in base.model.named_modules()
                              if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
        accepted = inspect.signature(base.model.forward).parameters
        self._keep_last_logits = "logits_to_keep" in accepted
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40).
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self.batch = RunningBatch(self._forward, self.pad_id, base.device)
        self._preload = list(dict.fromkeys([*settings.adapter_preload, *settings.adapter_pin]))
        # Counters for tests and benchmarks (Prometheus has the same figures, process-wide).
        self.prefills = self.joins = self.steps = self.aborted = self.hits = self.misses = 0
        self._tps_window = [time.perf_counter(), 0]

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        for name in self._preload:
            self.loader.fetch(name)  # installed by the model thread when read (see _on_loaded)
        self._thread = threading.Thread(target=self._serve_forever, name="inference-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout)
        self.loader.close()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    # --- called from request handlers -----------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _detokenize(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def submit(self, prompt_ids: list[int], adapter: str | None, sha256: str | None, params: SamplingParams,
               on_text: Callable[[str], None] | None = None, mix: Mix | None = None) -> _Request:
        """Queue one request (bounds checked here, so an error names the field before anything runs).
        ``mix``: sorted (source name, sha256, weight) tuples, checked combinable by the caller; it replaces
        ``adapter`` / ``sha256``."""
        if mix is not None:
            if adapter is not None:
                raise InvalidRequest("give either adapter or adapters, not both", param="adapters")
            mix = tuple(sorted(mix))
            adapter, sha256 = mix_name(mix), mix_sha256(mix)
        if not prompt_ids:
            raise InvalidRequest("prompt is empty after tokenization", param="prompt")
        if len(prompt_ids) > self.settings.max_prompt_tokens:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; the limit is {self.settings.max_prompt_tokens} "
                                 "(BONE_MAX_PROMPT_TOKENS)", param="prompt")
        if self.max_positions and len(prompt_ids) + params.max_new_tokens > self.max_positions:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                                 f"the model's context of {self.max_positions} tokens", param="max_new_tokens")
        if not self.ready:
            raise ServiceUnavailable("the inference engine is not running", code="engine_unavailable")
        with self._pending_lock:
            if self._pending >= self.settings.max_queue:
                raise RateLimited(f"{self._pending} generation requests are waiting for a batch slot "
                                  f"(BONE_MAX_QUEUE={self.settings.max_queue}); retry shortly",
                                  retry_after=1.0, code="engine_busy")
            self._pending += 1
        request = _Request(prompt_ids, adapter, sha256, params, on_text=on_text, mix=mix)
        self._inbox.put(request)
        return request

    async def result(self, request: _Request) -> GenerationResult:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(request.future), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"generation did not finish within {self.settings.request_timeout_s:g} s "
                                     "(BONE_REQUEST_TIMEOUT_S)", code="timeout") from None
        finally:
            # A no-op when finished. Otherwise (timeout, client gone) a waiting request was cancelled with
            # the awaited future, and a running row stops at the next step, freeing its batch slot.
            request.abandoned.set()

    async def generate(self, prompt_ids: list[int], adapter: str | None, sha256: str | None,
                       params: SamplingParams) -> GenerationResult:
        return await self.result(self.submit(prompt_ids, adapter, sha256, params))

    def evict_adapter(self, name: str) -> None:
        """Free a deleted adapter's memory (requests check the registry first, so it is never served)."""
        self._inbox.put(_Control(lambda: self.cache.evict(name, in_use=self._in_use())))

    # --- the model thread -----------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            if not self._receive():
                break
            self._admit()
            if self.batch.rows:
                self._step()
        for row in self.batch.clear():
            row.tag.future.set_exception(ServiceUnavailable("the server is shutting down", code="shutting_down"))
        while self._waiting:
            self._fail(self._waiting.popleft(), ServiceUnavailable("the server is shutting down", code="shutting_down"))

    def _receive(self) -> bool:
        """Take what arrived. Busy: never wait. Idle: block until a request comes, then gather for up to
        ``batch_wait_ms`` (or until a full batch waits). Returns False on stop."""
        idle, deadline = not self.batch.rows, None
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
            if item is _STOP:
                return False
            if isinstance(item, _Request):
                self._waiting.append(item)
                if idle and deadline is None:
                    deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
                if len(self._waiting) >= self.settings.max_batch_size:
                    idle = False  # a full batch is here: drain the rest without waiting
            elif isinstance(item, _Loaded):
                self._on_loaded(item)
                if idle and deadline is None:
                    return True
            else:
                try:
                    item.action()
                except Exception:  # noqa: BLE001 - housekeeping must never kill the model thread
                    log.exception("engine control action failed")

    def _on_loaded(self, item: _Loaded) -> None:
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
        self.cache.cpu_put(fetched)
        for request in users:  # an older sha still in the CPU tier keeps it; else the version just read
            if request.sha256 == fetched.sha256 or self.cache.cpu_get((request.adapter, request.sha256 or "")) is None:
                request.fetched = fetched
        if item.name in self._preload and not users:
            try:
                self.cache.install(fetched, self._in_use())
            except Exception:  # noqa: BLE001 - a broken preload must not stop serving
                log.exception("preloading adapter %r failed", item.name)

    def _in_use(self) -> set[str]:
        return {row.adapter_slot for row in self.batch.rows}

    def _admit(self) -> None:
        if not self._waiting or not self.batch.accepts_joins:
            return
        room = self.settings.max_batch_size - len(self.batch.rows)
        in_use, chosen, still = self._in_use(), [], deque()
        for request in self._waiting:
            if request.future.cancelled():  # the caller gave up (timeout, disconnect) while it waited
                self._release()
                continue
            slot = self._resolve(request, in_use, must_progress=not self.batch.rows and not chosen) if len(chosen) < room else None
            if slot is False:
                continue  # answered with an error
            if slot is None:
                still.append(request)
                continue
            if not request.future.set_running_or_notify_cancel():
                self._release()
                continue
            in_use.add(slot)
            chosen.append(Row(prompt_ids=request.prompt_ids, adapter_slot=slot, params=request.params,
                              eos_ids=self.eos_ids, decode=self._detokenize, on_text=request.on_text,
                              should_stop=request.abandoned.is_set, tag=request))
        self._waiting = still
        if not chosen:
            return
        self.prefills += 1
        self.joins += bool(self.batch.rows)
        for row in chosen:
            self._release()
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

    def _resolve(self, request: _Request, in_use: set[str], must_progress: bool) -> str | None | bool:
        """The request's slot in the model, None if not ready yet (loading, or no room while others run),
        False if it failed (already answered)."""
        if request.adapter is None:
            return BASE_SLOT
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
            if request.mix is None:
                self.loader.fetch(request.adapter)
            else:
                mix, registry = request.mix, self.cache.registry
                self.loader.fetch(request.adapter, lambda: fetch_mix(registry, mix, self._out_features))
            return None
        if not must_progress and not self.cache.has_room(fetched.size_bytes, in_use):
            return None  # joins when running rows free their adapters
        try:
            return self.cache.install(fetched, in_use)
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint, an unservable adapter
            if not isinstance(exc, ServiceError):
                log.exception("installing adapter %r failed", request.adapter)
            self._fail(request, exc)
            return False

    def _step(self) -> None:
        rows = len(self.batch.rows)
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
        self._count_tokens(rows)
        for row in done:
            self._answer(row)
        if done:
            self.cache.shrink(self._in_use())
        if not self.batch.rows:
            self.host.end_batch()

    def _answer(self, row: Row) -> None:
        request: _Request = row.tag
        self.aborted += row.finish_reason == "abort"
        metrics.GENERATED_TOKENS.labels("adapter" if request.adapter else "base").inc(len(row.generated))
        mix = None if request.mix is None else {name: weight for name, _, weight in request.mix}
        request.future.set_result(GenerationResult(
            text=row.text, finish_reason=row.finish_reason or "length", prompt_tokens=len(row.prompt_ids),
            completion_tokens=len(row.generated), adapter=None if mix else request.adapter, adapters=mix))

    def _count_tokens(self, n: int) -> None:
        """tokens/s over windows of at least half a second (a single step is too noisy to export)."""
        window = self._tps_window
        window[1] += n
        elapsed = time.perf_counter() - window[0]
        if elapsed >= 0.5:
            metrics.GENERATION_TOKENS_PER_S.set(window[1] / elapsed)
            window[0], window[1] = time.perf_counter(), 0

    def _fail(self, request: _Request, exc: BaseException) -> None:
        self._release()
        if request.future.set_running_or_notify_cancel():
            request.future.set_exception(exc)

    def _release(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _forward(self, ids, mask, positions, cache, slots: list[str]):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self._cache_arg: cache,
                  "use_cache": True}
        if self._keep_last_logits:
            kwargs["logits_to_keep"] = 1
        out = self.host.forward(slots, **kwargs)
        return out.logits[:, -1, :], getattr(out, self._cache_arg)


def _eos_ids(base: LoadedBaseModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(base.model, "generation_config", None), base.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
