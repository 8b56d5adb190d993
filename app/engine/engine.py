"""The inference engine: one thread owns the base model; async handlers submit requests and await futures.

This module is the engine as the rest of the server sees it: ``InferenceEngine`` sets up the serving model,
the adapter pool and the running batch, holds the ``Scheduler`` that runs the model thread, and gives request
handlers their side: ``tokenize`` / ``tokenize_async`` (off the event loop), ``submit`` (every bound checked
before anything is queued), ``result`` (the request timeout) and ``evict_adapter``. What the model thread
does with the queue (the queue's bounds per key, the scheduler loop, continuous batching, cold adapter loads)
is ``app.engine.scheduler``; what passes between the two is ``app.engine.messages``.

A request may also name a *mix* of Bone adapters (``{"a": 0.7, "b": 0.3}``): a virtual adapter whose blocks
are the exact weighted sum of the sources', built by the loader from the registry, never written back, and
held in the adapter pool like any adapter (see ``app.engine.adapter_pool``); its rows batch with everything
else.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import torch

from app import metrics
from app.engine import kv_cache
from app.engine.adapter_pool import AdapterCache, mix_name, mix_sha256
from app.engine.batch import RunningBatch
from app.engine.messages import GenerationRequest, GenerationResult, Request
from app.engine.model_host import ModelHost
from app.engine.scheduler import Scheduler
from core.base_model import LoadedBaseModel, eos_token_ids
from core.errors import InvalidRequest, ServiceUnavailable
from core.registry import AdapterRegistry
from core.settings import Settings

if TYPE_CHECKING:  # transformers is imported when the model loads
    from transformers import PreTrainedTokenizerBase

__all__ = ["GenerationResult", "InferenceEngine"]


def default_max_batch_size(device: torch.device) -> int:
    """``BONE_MAX_BATCH_SIZE`` when unset: a GPU's step time barely grows with rows up to dozens (the weights
    are read once per step whatever the batch), a CPU's grows with every row."""
    return 64 if device.type == "cuda" else 16


def default_kv_budget_tokens(settings: Settings, max_batch_size: int) -> int:
    """``BONE_KV_BUDGET_TOKENS`` when unset: what a full batch of the longest requests the limits allow holds,
    the bound those limits already imply (so the budget only binds when set lower)."""
    return max_batch_size * (settings.max_prompt_tokens + settings.max_new_tokens)


def decode_one(tokenizer: PreTrainedTokenizerBase, ids: list[int], skip_special_tokens: bool) -> str:
    """One sequence of token ids as text (``decode`` is typed for batches too: a list of ids gives one str)."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)
    return text


class InferenceEngine:
    def __init__(self, base: LoadedBaseModel, registry: AdapterRegistry, settings: Settings) -> None:
        self.max_batch_size = settings.max_batch_size or default_max_batch_size(base.device)
        self.kv_budget_tokens = settings.kv_budget_tokens or default_kv_budget_tokens(settings, self.max_batch_size)
        # resolved once, for all
        settings = settings.model_copy(
            update={"max_batch_size": self.max_batch_size, "kv_budget_tokens": self.kv_budget_tokens}
        )
        metrics.ENGINE_MAX_BATCH_SIZE.set(self.max_batch_size)
        metrics.ENGINE_KV_BUDGET_TOKENS.set(self.kv_budget_tokens)
        self.base, self.settings = base, settings
        self.tokenizer = base.tokenizer
        # The model thread detokenizes every row at every step with a tokenizer of its own: sharing one (fast
        # tokenizers refuse concurrent use) would make it wait on the request handlers' tokenizing, and them
        # on it. Only the model thread uses this copy, so it needs no lock.
        self._model_tokenizer = copy.deepcopy(base.tokenizer)
        self.host = ModelHost(base.model)
        self.host.on_working_bytes = self._batch_working_bytes
        self.cache = AdapterCache(
            registry,
            self.host,
            max_count=settings.adapter_cache_size,
            max_bytes=settings.adapter_cache_bytes,
            cpu_bytes=settings.adapter_cpu_cache_bytes,
            device=base.device,
            dtype=self.host.dtype,
            pinned=settings.adapter_pin,
        )
        # the request handlers' threads share ``tokenizer``: fast tokenizers refuse concurrent use ("Already borrowed")
        self._tokenizer_lock = threading.Lock()
        self.eos_ids = eos_token_ids(base.model, base.tokenizer)
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        )
        self.max_positions = getattr(base.model.config, "max_position_embeddings", None)
        accepted = inspect.signature(base.model.forward).parameters
        self._keep_last_logits = "logits_to_keep" in accepted
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40).
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        # Rows join a running batch mid-flight for full-attention and sliding-window caches; any other kind
        # of cache drains first. Said once here, in the log and in /metrics.
        self.join_mode, reason = kv_cache.join_mode(base.model)
        kv_cache.announce(self.join_mode, reason)
        self.batch = RunningBatch(
            self._forward,
            self.pad_id,
            base.device,
            joins=self.join_mode == kv_cache.JOINS,
            prefill_chunk=settings.prefill_chunk if kv_cache.chunkable(base.model) else 0,
            windows=kv_cache.windows(base.model) if self.join_mode == kv_cache.JOINS else None,
            max_rows=self.max_batch_size,
            budget_tokens=self.kv_budget_tokens,
        )
        # out_features per module path: mixes of MiSS-mini adapters tile their blocks to (r, out)
        out_features = {
            path: int(getattr(m, "out_features", None) or m.weight.shape[-1])
            for path, m in base.model.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
        }
        self.scheduler = Scheduler(
            settings,
            self.host,
            self.cache,
            self.batch,
            eos_ids=self.eos_ids,
            decode=self._detokenize,
            out_features=out_features,
        )

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.scheduler.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.scheduler.stop(timeout)

    @property
    def ready(self) -> bool:
        return self.scheduler.running

    @property
    def pending(self) -> int:
        return self.scheduler.pending

    # --- called from request handlers -----------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def tokenize_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenize`` on a worker thread: a long prompt never holds the event loop (bound its bytes first)."""
        return await anyio.to_thread.run_sync(self.tokenize, text, add_special_tokens)

    def _detokenize(self, ids: list[int]) -> str:
        """The model thread's decode (each row's text, every step): its own tokenizer, no lock to wait on."""
        return decode_one(self._model_tokenizer, ids, skip_special_tokens=True)

    def submit(
        self, job: GenerationRequest, on_text: Callable[[str], None] | None = None, key: str | None = None
    ) -> Request:
        """Queue one generation (bounds checked here, so an error names the field before anything runs, and
        nothing a row carries can fail the batch it joins). A mix in ``job.target`` must have been checked
        combinable by the caller. ``key``: who asks; a key may hold at most ``max_queue_per_key`` of the
        waiting requests (None: internal callers)."""
        prompt_ids, params = job.prompt_ids, job.params
        adapter, sha256, mix = job.target.adapter, job.target.sha256, job.target.mix
        params.check()
        if mix is not None:
            mix = tuple(sorted(mix))
            adapter, sha256 = mix_name(mix), mix_sha256(mix)
        if not prompt_ids:
            raise InvalidRequest("prompt is empty after tokenization", param="prompt")
        if len(prompt_ids) > self.settings.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt has {len(prompt_ids)} tokens; the limit is {self.settings.max_prompt_tokens} "
                "(BONE_MAX_PROMPT_TOKENS)",
                param="prompt",
            )
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:  # on a GPU, a device-side assert for everyone
            raise InvalidRequest(
                f"prompt holds token ids outside the model's vocabulary (0..{self.vocab_size - 1})", param="prompt"
            )
        if self.max_positions and len(prompt_ids) + params.max_new_tokens > self.max_positions:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {self.max_positions} tokens",
                param="max_new_tokens",
            )
        if len(prompt_ids) + params.max_new_tokens > self.kv_budget_tokens:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the KV "
                f"cache budget of {self.kv_budget_tokens} tokens (BONE_KV_BUDGET_TOKENS)",
                param="max_new_tokens",
            )
        if not self.ready:
            raise ServiceUnavailable("the inference engine is not running", code="engine_unavailable")
        request = Request(prompt_ids, adapter, sha256, params, on_text=on_text, mix=mix, key=key)
        self.scheduler.enqueue(request)
        return request

    async def result(self, request: Request) -> GenerationResult:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(request.future), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ServiceUnavailable(
                f"generation did not finish within {self.settings.request_timeout_s:g} s (BONE_REQUEST_TIMEOUT_S)",
                code="timeout",
            ) from None
        finally:
            # A no-op when finished. Otherwise (timeout, client gone) a waiting request was cancelled with
            # the awaited future, and a running row stops at the next step, freeing its batch slot.
            request.abandoned.set()

    def evict_adapter(self, name: str) -> None:
        """Free a deleted adapter's memory (requests check the registry first, so it is never served)."""
        self.scheduler.run_between_steps(lambda: self.cache.evict(name, in_use=self.scheduler.in_use()))

    # --- the model call the model thread makes (``RunningBatch``'s forward) --------------------------
    def _forward(self, ids, mask, positions, cache, slots: list[str], all_logits: bool = False, side: bool = False):
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            self._cache_arg: cache,
            "use_cache": True,
        }
        if self._keep_last_logits and not all_logits:
            kwargs["logits_to_keep"] = 1
        self.host.bat_budget_bytes = self.cache.batch_room
        out = self.host.forward(slots, side=side, **kwargs)
        return (out.logits if all_logits else out.logits[:, -1, :]), getattr(out, self._cache_arg)

    def _batch_working_bytes(self, working: int) -> None:
        """The running batch's working memory counts against the adapter pool's bytes, and shows in /metrics."""
        self.cache.working_bytes = working
        metrics.BATCH_WORKING_BYTES.set(working)

    def detokenize(self, ids: list[int]) -> str:
        """Token ids back to text, special tokens spelled out (an echoed prompt reads as it was scored)."""
        with self._tokenizer_lock:
            return decode_one(self.tokenizer, ids, skip_special_tokens=False)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token on its own, as OpenAI's logprobs name them (special tokens spelled out)."""
        with self._tokenizer_lock:
            return [decode_one(self.tokenizer, [i], skip_special_tokens=False) for i in ids]

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the model's embedding rows (may exceed the tokenizer's vocabulary)."""
        return int(getattr(self.base.model.config, "vocab_size", None) or len(self.tokenizer))
