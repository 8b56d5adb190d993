"""The inference engine: one thread owns the base model; async handlers submit requests and await futures.

The thread takes whatever is waiting (up to ``max_batch_size`` requests arriving within ``batch_wait_ms``),
*whatever their adapters*, and runs them as one batch: every row names its adapter and the Bone layers
select per row in a single forward (``bone.routing``). Adapter loads and evictions happen in this thread
between batches, so they never touch a running batch.

The base model is wrapped with Bone when the first adapter arrives (``ModelHost``) and stays wrapped: adapters
come and go without reloading anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from app.adapter_cache import AdapterCache
from app.decoding import Row, SamplingParams, decode_batch
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


@dataclass
class _Request:
    prompt_ids: list[int]
    adapter: str | None
    sha256: str | None
    params: SamplingParams
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    on_text: Callable[[str], None] | None = None
    abandoned: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Control:
    """Work for the model thread between batches (e.g. evicting a deleted adapter)."""

    action: Callable[[], Any]


_STOP = object()


class InferenceEngine:
    def __init__(self, base: LoadedBaseModel, registry: AdapterRegistry, settings: Settings) -> None:
        self.base, self.settings = base, settings
        self.tokenizer = base.tokenizer
        self.host = ModelHost(base.model)
        self.cache = AdapterCache(registry, self.host, max_count=settings.adapter_cache_size,
                                  max_bytes=settings.adapter_cache_bytes, device=base.device)
        self._queue: queue.Queue = queue.Queue()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers refuse concurrent use ("Already borrowed")
        self._thread: threading.Thread | None = None
        self.eos_ids = _eos_ids(base)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.max_positions = getattr(base.model.config, "max_position_embeddings", None)
        accepted = inspect.signature(base.model.forward).parameters
        self._keep_last_logits = "logits_to_keep" in accepted
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40).
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self.batches_run = 0

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve_forever, name="inference-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- called from request handlers -----------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text)["input_ids"])

    def _detokenize(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def submit(self, prompt_ids: list[int], adapter: str | None, sha256: str | None, params: SamplingParams,
               on_text: Callable[[str], None] | None = None) -> _Request:
        """Queue one request (bounds checked here, so an error names the field before anything runs)."""
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
        if self._queue.qsize() >= self.settings.max_queue:
            raise RateLimited(f"{self._queue.qsize()} generation requests are waiting; retry shortly",
                              retry_after=1.0, code="engine_busy")
        request = _Request(prompt_ids, adapter, sha256, params, on_text=on_text)
        self._queue.put(request)
        return request

    async def result(self, request: _Request) -> GenerationResult:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(request.future), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"generation did not finish within {self.settings.request_timeout_s:g} s",
                                     code="timeout") from None
        finally:
            request.abandoned.set()  # a no-op when finished; stops the row when the client went away

    async def generate(self, prompt_ids: list[int], adapter: str | None, sha256: str | None,
                       params: SamplingParams) -> GenerationResult:
        return await self.result(self.submit(prompt_ids, adapter, sha256, params))

    def evict_adapter(self, name: str) -> None:
        """Free a deleted adapter's memory (requests check the registry first, so it is never served)."""
        self._queue.put(_Control(lambda: self.cache.evict(name)))

    # --- the model thread -----------------------------------------------------------------------------
    def _serve_forever(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            batch, stop = self._collect()
            if batch:
                self._run_batch(batch)
            if stop:
                self._fail_waiting()
                return

    def _collect(self) -> tuple[list[_Request], bool]:
        """Block for one request, then take what else arrives within ``batch_wait_ms``, up to the batch size."""
        batch: list[_Request] = []
        deadline = None
        while len(batch) < self.settings.max_batch_size:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout) if timeout != 0.0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            if isinstance(item, _Control):
                self._run_control(item)
                continue
            if item.future.set_running_or_notify_cancel():  # False: the caller gave up while it waited
                batch.append(item)
                deadline = deadline or time.monotonic() + self.settings.batch_wait_ms / 1000
        return batch, False

    def _run_control(self, item: _Control) -> None:
        try:
            item.action()
        except Exception:  # noqa: BLE001 - housekeeping must never kill the model thread
            log.exception("engine control action failed")

    def _run_batch(self, batch: list[_Request]) -> None:
        rows, members = self._rows_for(batch)
        if not rows:
            return
        try:
            # no_grad, not inference_mode: bone caches per-tensor results keyed on ``_version``, which
            # inference tensors do not have.
            with torch.no_grad():
                decode_batch(self._forward, rows, self.pad_id, self.base.device)
        except Exception as exc:  # noqa: BLE001 - reported to every caller of the batch, thread lives on
            log.exception("generation batch of %d failed", len(rows))
            for request in members:
                request.future.set_exception(exc)
            return
        finally:
            self.host.end_batch()
        self.batches_run += 1
        for row, request in zip(rows, members):
            request.future.set_result(GenerationResult(
                text=row.text, finish_reason=row.finish_reason or "length", prompt_tokens=len(row.prompt_ids),
                completion_tokens=len(row.generated), adapter=request.adapter))

    def _rows_for(self, batch: list[_Request]) -> tuple[list[Row], list[_Request]]:
        """Resolve every request's adapter to a loaded slot; a request whose adapter fails is answered alone."""
        rows, members, pinned = [], [], set()
        for request in batch:
            slot = BASE_SLOT
            if request.adapter is not None:
                try:
                    slot = self.cache.acquire(request.adapter, request.sha256 or "", pinned)
                except Exception as exc:  # noqa: BLE001 - NotFound, CorruptAdapter, a bad checkpoint
                    if not isinstance(exc, ServiceError):
                        log.exception("loading adapter %r failed", request.adapter)
                    request.future.set_exception(exc)
                    continue
                pinned.add(slot)
            rows.append(Row(prompt_ids=request.prompt_ids, adapter_slot=slot, params=request.params,
                            eos_ids=self.eos_ids, decode=self._detokenize, on_text=request.on_text,
                            should_stop=request.abandoned.is_set))
            members.append(request)
        return rows, members

    def _forward(self, ids, mask, positions, cache, slots: list[str]):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self._cache_arg: cache,
                  "use_cache": True}
        if self._keep_last_logits:
            kwargs["logits_to_keep"] = 1
        out = self.host.forward(slots, **kwargs)
        return out.logits[:, -1, :], getattr(out, self._cache_arg)

    def _fail_waiting(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(ServiceUnavailable("the server is shutting down", code="shutting_down"))


def _eos_ids(base: LoadedBaseModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(base.model, "generation_config", None), base.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
