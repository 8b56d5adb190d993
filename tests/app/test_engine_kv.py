"""The engine's KV cache bounds, without HTTP: chunked prefill (a long prompt enters chunk by chunk between
decode steps, generating exactly what it does prefilled at once, while running rows keep streaming) and the
KV budget in tokens (admission waits for room, a request that can never fit is refused, a full queue answers
429)."""

from __future__ import annotations

import time

import pytest
import torch
from prometheus_client import REGISTRY

from app.engine import GenerationRequest, InferenceEngine, Target
from app.engine.batch import SamplingParams
from core.errors import InvalidRequest, RateLimited
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter

# The embedded model's tokenizer is byte-level: this prompt is ~300 tokens.
LONG_PROMPT = " ".join(f"sentence {i} of a long story about bones and adapters." for i in range(6))


def submit(engine: InferenceEngine, prompt: str, adapter: str | None = None, n: int = 12, on_text=None):
    sha = None if adapter is None else AdapterRegistry(engine.settings.registry_dir).get(adapter).sha256
    params = SamplingParams(max_new_tokens=n, temperature=0)
    return engine.submit(GenerationRequest(Target(adapter, sha), engine.tokenize(prompt), params), on_text=on_text)


def alone(engine: InferenceEngine, prompt: str, adapter: str | None = None, n: int = 12) -> list[int]:
    return submit(engine, prompt, adapter, n).future.result(120).token_ids


def test_a_prompt_prefilled_in_chunks_generates_what_it_does_prefilled_at_once(make_engine):
    engine = make_engine(prefill_chunk=0)
    publish_adapter(engine.settings, "chunky", seed=7)
    assert len(engine.tokenize(LONG_PROMPT)) > 200
    whole = [alone(engine, LONG_PROMPT, adapter, 24) for adapter in (None, "chunky")]
    assert engine.batch.chunks == 0
    for chunk in (37, 64):  # uneven: the last chunk is shorter
        engine.batch.prefill_chunk = chunk
        before = engine.batch.chunks
        chunked = [alone(engine, LONG_PROMPT, adapter, 24) for adapter in (None, "chunky")]
        assert engine.batch.chunks - before >= 2 * (200 // chunk)  # it really went in chunks
        assert chunked == whole
    assert whole[0] != whole[1]  # the adapter is really applied to the chunks


def test_running_rows_keep_decoding_while_a_long_prompt_enters(make_engine):
    engine = make_engine(prefill_chunk=16)
    short_alone = alone(engine, "Once upon a time", None, 300)
    long_alone = alone(engine, LONG_PROMPT, None, 12)
    steps: list[tuple[int, int]] = []  # (chunks prefilled so far, rows) at each decode step
    step = engine.batch.step

    def counted_step():
        steps.append((engine.batch.chunks, len(engine.batch.rows)))
        return step()

    engine.batch.step = counted_step
    running = submit(engine, "Once upon a time", None, 300)
    while not steps:  # the running row is decoding
        time.sleep(0.002)
    start = engine.batch.chunks
    long_ids = submit(engine, LONG_PROMPT, None, 12).future.result(120).token_ids
    end = start + -(-len(engine.tokenize(LONG_PROMPT)) // 16)
    assert engine.batch.chunks == end
    assert not running.future.done()  # the long prompt entered and finished while the row ran
    assert running.future.result(120).token_ids == short_alone
    assert long_ids == long_alone
    # one decode step of the running row after each chunk of the long prompt but its last (then it joined)
    between = [count for count, rows in steps if start < count < end]
    assert sorted(set(between)) == list(range(start + 1, end)), (start, end, steps)
    assert all(rows == 1 for count, rows in steps if start < count < end)
    assert any(rows == 2 for count, rows in steps if count == end)


def test_the_kv_budget_holds_back_a_request_until_running_rows_leave(make_engine):
    engine = make_engine(kv_budget_tokens=100, max_queue=1, prefill_chunk=0)
    assert REGISTRY.get_sample_value("bone_engine_kv_budget_tokens") == 100
    cost = len(engine.tokenize("Once upon a time")) + 60
    assert cost <= 100 < 2 * cost
    expected = alone(engine, "Once upon a time", None, 60)
    steps: list[tuple[int, int]] = []  # (rows, KV tokens reserved) at each decode step
    step = engine.batch.step

    def counted_step():
        steps.append((len(engine.batch.rows), engine.scheduler.kv_reserved()))
        return step()

    engine.batch.step = counted_step
    first = submit(engine, "Once upon a time", None, 60)
    while not steps:
        time.sleep(0.002)
    second = submit(engine, "Once upon a time", None, 60)
    with pytest.raises(RateLimited) as busy:  # the one queue place is taken by the request waiting for KV room
        submit(engine, "Once upon a time", None, 60)
    assert busy.value.retry_after > 0
    assert not first.future.done()
    assert [first.future.result(120).token_ids, second.future.result(120).token_ids] == [expected, expected]
    assert set(steps) == {(1, cost)}  # never both at once: they did not fit together
    deadline = time.monotonic() + 5
    while REGISTRY.get_sample_value("bone_engine_kv_tokens_reserved") != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert REGISTRY.get_sample_value("bone_engine_kv_tokens_reserved") == 0


def test_a_request_larger_than_the_kv_budget_is_refused_naming_the_field(make_engine):
    engine = make_engine(kv_budget_tokens=50)
    with pytest.raises(InvalidRequest) as refused:
        submit(engine, "Once upon a time", None, 40)
    assert refused.value.param == "max_new_tokens" and "BONE_KV_BUDGET_TOKENS" in str(refused.value)
    assert len(alone(engine, "Once upon a time", None, 20)) == 20  # one that fits is served


def test_the_default_kv_budget_is_what_the_batch_and_token_limits_imply(make_engine):
    engine = make_engine(max_batch_size=3, max_prompt_tokens=100, max_new_tokens=20)
    assert engine.kv_budget_tokens == engine.settings.kv_budget_tokens == 3 * 120


def test_a_long_prompt_out_of_memory_in_a_chunk_fails_no_running_row(make_engine):
    """A chunk of the entering prompt runs out of device memory next to a running row: the running row carries
    on untouched, the newcomer is set aside and resumes (prefilled at once) when it leaves; both end with what
    they generate alone."""
    engine = make_engine(prefill_chunk=16)
    short_alone = alone(engine, "Once upon a time", None, 80)
    long_alone = alone(engine, LONG_PROMPT, None, 12)
    failed: list[int] = []

    def hook(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is not None and positions.shape[1] == 16 and int(positions.min()) >= 64:
            failed.append(int(positions.min()))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = engine.base.model.model.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        running = submit(engine, "Once upon a time", None, 80)
        while not engine.batch.rows:
            time.sleep(0.002)
        long = submit(engine, LONG_PROMPT, None, 12)
        assert running.future.result(120).token_ids == short_alone
        assert long.future.result(120).token_ids == long_alone
    finally:
        handle.remove()
    assert failed == [64]  # the fifth chunk failed once; the row then resumed prefilled at once
    assert engine.scheduler.failed_rows == 0 and not engine.batch.parked and engine.batch.entering is None
