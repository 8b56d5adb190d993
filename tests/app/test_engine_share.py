"""A key's share of the running batch (``app.engine.share``), on the real engine and the embedded model: once
another key waits, a key at its share of the rows or of the KV budget gets no new row, so the other key's
request takes the room as soon as there is some, and a key alone may still fill the batch.

Every generation here runs to its ``max_new_tokens`` (the engine's end-of-sequence ids are emptied), so which
request ends first follows from the admission order alone. A ``gate`` holds the model thread between two
steps while requests are submitted, so they reach one admission pass together."""

from __future__ import annotations

import threading
import time

from prometheus_client import REGISTRY

from app.engine import GenerationRequest, Target
from app.engine.batch import SamplingParams
from tests.app.conftest import publish_adapter


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


def submit(engine, prompt: str | list[int], n: int, key: str | None, adapter=None, sha=None):
    ids = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    return engine.submit(GenerationRequest(Target(adapter, sha), ids, greedy(n)), key=key)


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def full_length(engine) -> None:
    engine.scheduler.eos_ids = frozenset()  # rows end at max_new_tokens, never early


class Gate:
    """Holds the model thread between two steps (a control action) until opened; records the running rows."""

    def __init__(self, engine) -> None:
        self.opened, self.held = threading.Event(), threading.Event()
        self.rows: list[str | None] = []

        def hold() -> None:
            self.rows = [row.tag.key for row in engine.batch.rows]
            self.held.set()
            self.opened.wait(30)

        engine.scheduler.run_between_steps(hold)
        assert self.held.wait(30)

    def open(self) -> None:
        self.opened.set()


def finish_order(requests: dict[str, object]) -> list[str]:
    done: list[tuple[float, str]] = []
    for name, request in requests.items():
        request.future.add_done_callback(lambda _f, name=name: done.append((time.perf_counter(), name)))
    for request in requests.values():
        request.future.result(120)
    return [name for _, name in sorted(done)]


def test_a_key_at_its_row_share_leaves_the_free_row_to_a_key_whose_adapter_loads(make_engine):
    """Key a fills 3 of 4 rows while alone (over its share of 2) and queues more; key b's request needs a cold
    adapter. The free row waits the few milliseconds of the load for b instead of going to a's backlog (which
    would hold it for a's whole long generation): b ends before any of a's rows."""
    engine = make_engine(max_batch_size=4, batch_wait_ms=0)
    full_length(engine)
    info = publish_adapter(engine.settings, "tenant-b", seed=3)
    first = {f"a{i}": submit(engine, "Once upon a time", 120, "a") for i in range(3)}
    wait_until(lambda: len(engine.batch.rows) == 3)
    gate = Gate(engine)
    later = {"b": submit(engine, "Hi", 8, "b", adapter="tenant-b", sha=info.sha256)}
    later |= {f"a{i}": submit(engine, "Hello", 120, "a") for i in range(3, 6)}
    gate.open()
    order = finish_order(first | later)
    assert gate.rows == ["a", "a", "a"]
    assert order[0] == "b", order
    assert engine.scheduler.share_deferrals >= 1


def test_a_key_that_filled_the_batch_alone_gives_the_first_free_row_to_another_key(make_engine):
    """Key a filled all 4 rows while nobody waited (one short generation, three long) and queues more; key b
    asks for one. b is admitted when a's short row ends, not after a's long ones: it ends before them."""
    engine = make_engine(max_batch_size=4, batch_wait_ms=0)
    full_length(engine)
    gate = Gate(engine)
    first = {"a-short": submit(engine, "Hi", 10, "a")}
    first |= {f"a-long{i}": submit(engine, "Once upon a time", 100, "a") for i in range(3)}
    gate.open()
    wait_until(lambda: len(engine.batch.rows) == 4)
    gate = Gate(engine)
    later = {f"a-more{i}": submit(engine, "Hello", 100, "a") for i in range(3)}
    later["b"] = submit(engine, "Bone adapters", 10, "b")
    gate.open()
    order = finish_order(first | later)
    assert gate.rows == ["a"] * 4
    assert order[:2] == ["a-short", "b"], order


def test_a_key_beyond_its_kv_share_leaves_the_free_tokens_to_another_key(make_engine):
    """By rows key a comes first (1 running against b's 2), but its one long row holds more than half the KV
    budget: of a's and b's next requests, only one fits the budget left, and it is b's. Without the share a's
    would take the room and b's would wait for b's running rows to end."""
    prompt = [5, 6]  # token ids: their count is known before an engine runs
    long_a, running_b, small_a, small_b = 2 + 200, 2 + 80, 2 + 10, 2 + 12
    budget = long_a + 2 * running_b + small_b + 2
    assert small_a <= budget - long_a - 2 * running_b < small_a + small_b  # room for one of them, not both
    assert long_a > -(-budget // 2)  # a is beyond its KV share (half the budget) with its long row
    engine = make_engine(max_batch_size=8, batch_wait_ms=0, kv_budget_tokens=budget, max_new_tokens=256)
    full_length(engine)
    counted = REGISTRY.get_sample_value("bone_engine_share_deferrals_total") or 0.0
    requests = {"a-long": submit(engine, prompt, 200, "a")}
    wait_until(lambda: len(engine.batch.rows) == 1)
    gate = Gate(engine)
    requests |= {f"b{i}": submit(engine, prompt, 80, "b") for i in range(2)}
    gate.open()
    wait_until(lambda: len(engine.batch.rows) == 3)
    gate = Gate(engine)
    requests["a-small"] = submit(engine, prompt, 10, "a")
    requests["b-small"] = submit(engine, prompt, 12, "b")
    gate.open()
    order = finish_order(requests)
    assert gate.rows == ["a", "b", "b"]
    assert order.index("b-small") < order.index("a-small"), order
    assert engine.scheduler.share_deferrals == 1  # once, though a-small waited several steps
    assert REGISTRY.get_sample_value("bone_engine_share_deferrals_total") == counted + 1


def test_a_key_alone_fills_the_batch(make_engine):
    """Work-conserving: with nobody else waiting, one key takes every row (beyond its share of 2)."""
    engine = make_engine(max_batch_size=4, batch_wait_ms=0)
    full_length(engine)
    gate = Gate(engine)
    requests = [submit(engine, "Once upon a time", 40, "a") for _ in range(4)]
    gate.open()
    wait_until(lambda: len(engine.batch.rows) == 4 or all(r.future.done() for r in requests))
    assert len(engine.batch.rows) == 4
    assert all(r.future.result(120).completion_tokens == 40 for r in requests)
    assert engine.scheduler.share_deferrals == 0
