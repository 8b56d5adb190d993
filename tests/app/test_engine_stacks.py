"""The running batch's per-row plans survive a prompt entering chunk by chunk between decode steps (the entering
row has a routing of its own), and a join copies only the newcomer's stacked blocks (bone.block_stacks), not
every running adapter's again."""

from __future__ import annotations

import time

import pytest

from bone import routing as R
from tests.app.conftest import publish_adapter
from tests.app.test_engine_kv import LONG_PROMPT, alone, submit


@pytest.fixture
def builds(monkeypatch):
    calls: list = []
    orig = R.RowPlan.build.__func__
    monkeypatch.setattr(R.RowPlan, "build", classmethod(lambda cls, *a: calls.append(a[0]) or orig(cls, *a)))
    return calls


def test_a_chunked_join_rebuilds_no_running_plan_per_chunk_and_copies_only_the_newcomers_blocks(make_engine, builds):
    engine = make_engine(prefill_chunk=16)
    for i, name in enumerate(["run-a", "run-b", "run-c", "late"]):
        publish_adapter(engine.settings, name, seed=10 + i)
    late_alone = alone(engine, LONG_PROMPT, "late", 12)
    host = engine.host
    running = [submit(engine, "Once upon a time", name, 300) for name in ("run-a", "run-b", "run-c")]
    deadline = time.monotonic() + 60
    while len(engine.batch.rows) < 3 or engine.batch.entering is not None:
        assert time.monotonic() < deadline, "the three rows never ran together"
        time.sleep(0.002)
    time.sleep(0.05)  # a few decode steps of the three rows: their plans and stacks are built
    layers = host.bone_model.bone_layers()
    slot = engine.batch.rows[0].adapter_slot  # every adapter here targets the same projections
    adapted = sum(1 for _, layer in layers if slot in layer.bone_block)
    copied, chunks = host.stacked_blocks_copied, engine.batch.chunks
    builds.clear()

    assert submit(engine, LONG_PROMPT, "late", 12).future.result(120).token_ids == late_alone
    chunks = engine.batch.chunks - chunks
    assert chunks >= 10
    # per layer: the entering row's plan once, the batch's after the join and after the leave: not per chunk
    assert len(builds) <= 4 * len(layers), (len(builds), chunks, len(layers))
    # the join wrote the newcomer's blocks into the stacks; its leave (the last row) moved nothing
    assert host.stacked_blocks_copied - copied == adapted
    assert not any(r.future.done() for r in running)
