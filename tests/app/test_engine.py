"""The engine without HTTP: continuous batching (rows join a running batch and leave it), per-row adapters
in one batch equal to each request alone, cold loads that block nobody else, the byte-bounded pool, the
queue cap, pins and preloads, and switching resident adapters without copying weights."""

from __future__ import annotations

import threading
import time

import pytest

import app.engine.adapter_pool as adapter_cache
from app.engine import GenerationRequest, InferenceEngine, Target
from app.engine.batch import SamplingParams
from core.errors import RateLimited
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter

PROMPTS = ["Once upon a time", "Hi", "A somewhat longer prompt than the others", "Bone adapters", "x"]


def submit(engine: InferenceEngine, prompt: str, adapter: str | None = None, n: int = 12, **params):
    sha = None if adapter is None else AdapterRegistry(engine.settings.registry_dir).get(adapter).sha256
    params = SamplingParams(max_new_tokens=n, temperature=0, **params)
    return engine.submit(GenerationRequest(Target(adapter, sha), engine.tokenize(prompt), params))


def run(engine, jobs) -> list[str]:
    requests = [submit(engine, *job) for job in jobs]
    return [r.future.result(120).text for r in requests]


def test_rows_join_a_running_batch_and_match_each_request_alone(make_engine):
    engine = make_engine()
    for i in range(3):
        publish_adapter(engine.settings, f"cb-{i}", seed=40 + i, r=4 + 4 * (i % 2))
    jobs = [(PROMPTS[0], None, 200), (PROMPTS[1], "cb-0", 10), (PROMPTS[2], "cb-1", 30), (PROMPTS[3], "cb-2", 20)]
    alone = [run(engine, [job])[0] for job in jobs]
    joins = engine.scheduler.joins
    long = submit(engine, *jobs[0])
    while not engine.batch.rows:  # the long row is decoding
        time.sleep(0.005)
    late = [submit(engine, *job) for job in jobs[1:]]
    late_texts = [r.future.result(120).text for r in late]
    assert not long.future.done()  # the newcomers finished while the long row was still running
    assert [long.future.result(120).text, *late_texts] == alone
    assert engine.scheduler.joins > joins


def test_many_concurrent_requests_on_different_adapters(make_engine):
    engine = make_engine(max_batch_size=8)
    names = [f"many-{i}" for i in range(12)]
    for i, name in enumerate(names):
        publish_adapter(engine.settings, name, seed=100 + i)
    jobs = [(PROMPTS[i % len(PROMPTS)], name, 6 + i % 5) for i, name in enumerate(names)]
    alone = [run(engine, [job])[0] for job in jobs]
    assert len(set(alone)) > len(alone) // 2  # the adapters really differ
    assert run(engine, jobs * 2) == alone * 2


def test_tiny_byte_budget_still_answers_correctly(make_engine):
    roomy = make_engine()
    names = [f"tight-{i}" for i in range(5)]
    for i, name in enumerate(names):
        publish_adapter(roomy.settings, name, seed=200 + i)
    jobs = [(PROMPTS[i], name, 8) for i, name in enumerate(names)]
    expected = [run(roomy, [job])[0] for job in jobs]
    size = adapter_cache.fetch_adapter(AdapterRegistry(roomy.settings.registry_dir), names[0]).size_bytes
    tight = make_engine(adapter_cache_bytes=2 * size, adapter_cpu_cache_bytes=0)
    assert run(tight, jobs * 2) == expected * 2
    assert tight.cache.evictions >= 3 and tight.cache.resident_bytes <= 2 * size


def test_a_cold_load_blocks_no_other_request(make_engine, monkeypatch):
    engine = make_engine()
    publish_adapter(engine.settings, "slow", seed=1)
    publish_adapter(engine.settings, "warm", seed=2)
    run(engine, [("warm up", "warm", 2)])
    release = threading.Event()
    real_fetch = adapter_cache.fetch_adapter

    def slow_fetch(registry, name):
        if name == "slow":
            assert threading.current_thread() is not engine.scheduler.thread  # never on the model thread
            release.wait(30)
        return real_fetch(registry, name)

    monkeypatch.setattr(adapter_cache, "fetch_adapter", slow_fetch)
    cold = submit(engine, "cold", "slow")
    others = [submit(engine, "meanwhile", "warm"), submit(engine, "and the base")]
    for request in others:
        request.future.result(60)
    assert not cold.future.done()
    release.set()
    assert cold.future.result(60).completion_tokens > 0


def test_a_cold_adapter_is_read_while_its_request_waits_for_a_slot(make_engine):
    engine = make_engine(max_batch_size=1)
    publish_adapter(engine.settings, "queued", seed=3)
    key = ("queued", AdapterRegistry(engine.settings.registry_dir).get("queued").sha256)
    release = threading.Event()
    long = submit(engine, "hold the only slot", n=2000, stop=())
    long_row = None
    while long_row is None:  # the long row holds the batch's one slot
        long_row = next((row for row in engine.batch.rows if row.tag is long), None)
        time.sleep(0.005)
    long_row.should_stop = release.is_set  # it ends only when this test says so
    waiting = submit(engine, "after it", "queued", 4)
    deadline = time.monotonic() + 60
    while not engine.cache.holds(key) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.cache.holds(key) and not long.future.done()  # read before any slot opened
    release.set()
    assert long.future.result(60).finish_reason == "abort"
    assert waiting.future.result(60).completion_tokens == 4


def test_switching_resident_adapters_copies_no_weights(make_engine):
    engine = make_engine()
    for i in range(3):
        publish_adapter(engine.settings, f"sw-{i}", seed=300 + i)
    run(engine, [("load", f"sw-{i}", 2) for i in range(3)])
    model = engine.host.bone_model
    before = {name: (p.data_ptr(), p._version) for name, p in model.named_parameters()}
    installs, misses = engine.cache.installs, engine.scheduler.misses
    for order in ([0, 1, 2], [2, 0], [1], [1, 2, 0, 0]):
        run(engine, [(PROMPTS[k], f"sw-{k}", 3) for k in order])
    after = {name: (p.data_ptr(), p._version) for name, p in model.named_parameters()}
    assert after == before  # no parameter (base weight or adapter block) was moved or written
    assert (engine.cache.installs, engine.scheduler.misses) == (installs, misses)


def test_preload_and_pin(make_engine):
    probe = make_engine()
    a, b = publish_adapter(probe.settings, "pre", seed=1), publish_adapter(probe.settings, "pinned", seed=2)
    others = [publish_adapter(probe.settings, f"churn-{i}", seed=10 + i) for i in range(3)]
    engine = make_engine(adapter_preload=["pre"], adapter_pin=["pinned"], adapter_cache_size=2)
    deadline = time.monotonic() + 30
    while len(engine.cache) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(engine.cache.slots()) == {("pre", a.sha256), ("pinned", b.sha256)}
    run(engine, [("churn", info.name, 2) for info in others])
    assert ("pinned", b.sha256) in engine.cache.slots()
    assert engine.scheduler.hits == 0 and run(engine, [("pinned", "pinned", 2)]) and engine.scheduler.hits == 1


def test_queue_cap_refuses_with_retry_after(make_engine):
    engine = make_engine(max_batch_size=1, max_queue=2, max_new_tokens=2000)
    running = submit(engine, "long", None, 1500)
    while not engine.batch.rows:
        time.sleep(0.005)
    queued = [submit(engine, "wait", None, 2) for _ in range(2)]
    with pytest.raises(RateLimited) as refused:
        submit(engine, "one too many", None, 2)
    assert refused.value.retry_after >= 1
    running.abandoned.set()  # the client went away: its slot frees at the next step
    assert running.future.result(60).finish_reason == "abort"
    assert all(r.future.result(60).completion_tokens == 2 for r in queued)
    assert engine.scheduler.aborted == 1 and engine.pending == 0
