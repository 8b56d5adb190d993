"""A running batch's working memory (row indexes, scratch, dense Bat weights) is counted against
BONE_ADAPTER_CACHE_BYTES, shown in /metrics, and the Bat weights a batch holds stay within the pool's room."""

from __future__ import annotations

import torch

from app import metrics
from tests.app.conftest import publish_adapter


def _forward(engine, slots: list[str]) -> torch.Tensor:
    ids = torch.tensor([engine.tokenize("hello there")] * len(slots))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    logits, _ = engine._forward(ids, torch.ones_like(ids), positions, None, slots)
    return logits


def test_working_bytes_are_counted_in_the_pool_and_bound_bat_weights(make_engine):
    engine = make_engine()
    settings = engine.settings
    bone = publish_adapter(settings, "wb-bone", seed=1)
    bat = publish_adapter(settings, "wb-bat", seed=2, init_weights="bat")
    a = engine.cache.acquire("wb-bone", bone.sha256)
    b = engine.cache.acquire("wb-bat", bat.sha256)
    cache = engine.cache

    with torch.no_grad():
        # adapter a's rows are not contiguous (an index segment); b is Bat (a dense weight per layer)
        _forward(engine, [a, b, a])
        held = engine.host.working_bytes
        assert held > 0 and cache.working_bytes == held
        assert metrics.BATCH_WORKING_BYTES._value.get() == held
        assert cache.free_bytes == cache.max_bytes - cache.resident_bytes - held
        plans = [layer.row_plan for _, layer in engine.host.bone_model.bone_layers() if layer.row_plan.bat]
        assert plans and all(w is not None for p in plans for _, _, w in p.bat)  # room enough: held

        cache.max_bytes = cache.resident_bytes + 1  # no room left for dense Bat weights
        want = _forward(engine, [b, a, b])
        assert all(w is None for _, layer in engine.host.bone_model.bone_layers() for _, _, w in layer.row_plan.bat)
        assert engine.host.working_bytes < held
        cache.max_bytes = 2 * 1024**3
        engine.host.end_batch()
        assert cache.working_bytes == 0 and metrics.BATCH_WORKING_BYTES._value.get() == 0  # the batch's bytes freed
        torch.testing.assert_close(_forward(engine, [b, a, b]), want)  # held or rebuilt: the same outputs
