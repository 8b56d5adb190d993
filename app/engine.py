"""The inference engine: one thread owns the base model; async handlers submit requests and await futures.

This module is the engine as the rest of the server sees it: ``InferenceEngine`` sets up the serving model,
the adapter pool and its loader, starts and stops the model thread, and gives request handlers their side:
``tokenize`` / ``tokenize_async`` (off the event loop), ``submit`` (every bound checked before anything is
queued, the queue shared out per key), ``result`` (the request timeout)
and ``evict_adapter``. What the model thread does with the queue (the scheduler loop, continuous batching,
cold adapter loads) is ``app.engine_loop``; what passes between the two is ``app.engine_messages``.

A request may also name a *mix* of Bone adapters (``{"a": 0.7, "b": 0.3}``): a virtual adapter whose blocks
are the exact weighted sum of the sources', built by the loader from the registry, never written back, and
held in the adapter pool like any adapter (see ``app.adapter_cache``); its rows batch with everything else.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import anyio
import torch

from app.adapter_cache import AdapterCache, AdapterLoader, Mix, mix_name, mix_sha256
from app.decoding import RunningBatch, SamplingParams
from app.engine_loop import ModelThread
from app.engine_messages import STOP, Control, GenerationResult, Loaded, Request
from app.model_host import ModelHost
from core.base_model import LoadedBaseModel
from core.errors import InvalidRequest, RateLimited, ServiceUnavailable
from core.registry import AdapterRegistry
from core.settings import Settings

__all__ = ["GenerationResult", "InferenceEngine"]


class InferenceEngine(ModelThread):
    def __init__(self, base: LoadedBaseModel, registry: AdapterRegistry, settings: Settings) -> None:
        self.base, self.settings = base, settings
        self.tokenizer = base.tokenizer
        self.host = ModelHost(base.model)
        self.cache = AdapterCache(registry, self.host, max_count=settings.adapter_cache_size,
                                  max_bytes=settings.adapter_cache_bytes, cpu_bytes=settings.adapter_cpu_cache_bytes,
                                  device=base.device, dtype=self.host.dtype, pinned=settings.adapter_pin)
        self._inbox: queue.Queue = queue.Queue()
        self.loader = AdapterLoader(registry, lambda name, f, e: self._inbox.put(Loaded(name, f, e)))
        self._waiting: deque[Request] = deque()  # model thread only
        self._pending = 0  # submitted, not yet admitted or answered: what max_queue bounds
        self._pending_by_key: dict[str, int] = {}  # ... per key: what max_queue_per_key bounds
        self._pending_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers refuse concurrent use ("Already borrowed")
        self._thread: threading.Thread | None = None
        self.eos_ids = _eos_ids(base)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        )
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
        self.prefills = self.joins = self.steps = self.aborted = self.hits = self.misses = self.failed_rows = 0
        self._tps_window = [time.perf_counter(), 0]

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        for name in self._preload:
            self.loader.fetch(name)  # installed by the model thread when read (see _on_loaded)
        self._thread = threading.Thread(target=self._serve_forever, name="inference-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(STOP)
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

    async def tokenize_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenize`` on a worker thread: a long prompt never holds the event loop (bound its bytes first)."""
        return await anyio.to_thread.run_sync(self.tokenize, text, add_special_tokens)

    def _detokenize(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def submit(self, prompt_ids: list[int], adapter: str | None, sha256: str | None, params: SamplingParams,
               on_text: Callable[[str], None] | None = None, mix: Mix | None = None, key: str | None = None) -> Request:
        """Queue one request (bounds checked here, so an error names the field before anything runs, and
        nothing a row carries can fail the batch it joins). ``mix``: sorted (source name, sha256, weight)
        tuples, checked combinable by the caller; it replaces ``adapter`` / ``sha256``. ``key``: who asks;
        a key may hold at most ``max_queue_per_key`` of the waiting requests (None: internal callers)."""
        params.check()
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
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:  # on a GPU, a device-side assert for everyone
            raise InvalidRequest(f"prompt holds token ids outside the model's vocabulary (0..{self.vocab_size - 1})",
                                 param="prompt")
        if self.max_positions and len(prompt_ids) + params.max_new_tokens > self.max_positions:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {self.max_positions} tokens",
                param="max_new_tokens",
            )
        if not self.ready:
            raise ServiceUnavailable("the inference engine is not running", code="engine_unavailable")
        share = self.settings.queue_share
        with self._pending_lock:
            if self._pending >= self.settings.max_queue:
                raise RateLimited(f"{self._pending} generation requests are waiting for a batch slot "
                                  f"(BONE_MAX_QUEUE={self.settings.max_queue}); retry shortly",
                                  retry_after=1.0, code="engine_busy")
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
        request = Request(prompt_ids, adapter, sha256, params, on_text=on_text, mix=mix, key=key)
        self._inbox.put(request)
        return request

    async def result(self, request: Request) -> GenerationResult:
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
        self._inbox.put(Control(lambda: self.cache.evict(name, in_use=self._in_use())))

    # --- the model call the model thread makes (``RunningBatch``'s forward) --------------------------
    def _forward(self, ids, mask, positions, cache, slots: list[str], all_logits: bool = False):
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, self._cache_arg: cache,
                  "use_cache": True}
        if self._keep_last_logits and not all_logits:
            kwargs["logits_to_keep"] = 1
        out = self.host.forward(slots, **kwargs)
        return (out.logits if all_logits else out.logits[:, -1, :]), getattr(out, self._cache_arg)

    def detokenize(self, ids: list[int]) -> str:
        """Token ids back to text, special tokens spelled out (an echoed prompt reads as it was scored)."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token on its own, as OpenAI's logprobs name them (special tokens spelled out)."""
        with self._tokenizer_lock:
            return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the model's embedding rows (may exceed the tokenizer's vocabulary)."""
        return int(getattr(self.base.model.config, "vocab_size", None) or len(self.tokenizer))


def _eos_ids(base: LoadedBaseModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(base.model, "generation_config", None), base.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
