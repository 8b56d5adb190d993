"""BONE_DTYPE in the engine: the base loads in that dtype, adapter blocks are cast to it once when they enter
the device pool (and counted at that size), a mixed batch's rows equal each row alone, and every adapter layer
call takes the same-dtype serving path of ``bone.routing.row_forward`` (in bf16 too, not only in fp32)."""

from __future__ import annotations

import pytest
import torch

import bone.functional as BF
import bone.layer
from app.engine.adapter_pool import fetch_adapter
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter
from tests.app.test_engine import PROMPTS, run, submit

DTYPES = [("float32", torch.float32), ("bfloat16", torch.bfloat16)]


@pytest.fixture
def layer_calls(monkeypatch):
    """Counts adapter layer calls and chunk sums on the same-dtype path, by wrapping the real functions."""
    calls = {"row_forward": 0, "cached_chunk_sum": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(bone.layer, "row_forward", counting("row_forward", bone.layer.row_forward))
    monkeypatch.setattr(BF, "cached_chunk_sum", counting("cached_chunk_sum", BF.cached_chunk_sum))
    return calls


@pytest.mark.parametrize("setting, dtype", DTYPES)
def test_mixed_batch_rows_equal_each_row_alone_on_the_fast_path(make_engine, layer_calls, setting, dtype):
    engine = make_engine(dtype=setting, max_batch_size=8)
    names = [f"dt-{i}" for i in range(4)]
    for i, name in enumerate(names):
        publish_adapter(engine.settings, name, seed=70 + i)  # same r and targets: every layer holds every row
    jobs = [(PROMPTS[i], name, 8 + 3 * i) for i, name in enumerate(names)]
    alone = [run(engine, [job])[0] for job in jobs]

    layers = dict(engine.host.bone_model.bone_layers())
    assert {layer.base_layer.weight.dtype for layer in layers.values()} == {dtype}
    assert {blk.dtype for layer in layers.values() for blk in layer.bone_block.values()} == {dtype}

    layer_calls.update(row_forward=0, cached_chunk_sum=0)
    steps = engine.scheduler.steps
    requests = [submit(engine, *job) for job in jobs]
    mixed = [r.future.result(120).text for r in requests]
    assert mixed == alone
    assert engine.scheduler.steps - steps < sum(n for _, _, n in jobs)  # the rows decoded together, not one by one
    # Rows on adapters only, one r: the same-dtype path sums x's chunks once per layer call; the slow path
    # (blocks in another dtype than x) never calls cached_chunk_sum.
    assert layer_calls["row_forward"] > 0
    assert layer_calls["cached_chunk_sum"] == layer_calls["row_forward"]


@pytest.mark.parametrize("setting, dtype", DTYPES)
def test_the_pool_counts_adapters_at_the_base_dtype(make_engine, setting, dtype):
    engine = make_engine(dtype=setting)
    publish_adapter(engine.settings, "dt-size", seed=90)
    run(engine, [(PROMPTS[0], "dt-size", 2)])
    fetched = fetch_adapter(AdapterRegistry(engine.settings.registry_dir), "dt-size")
    assert all(t.dtype == torch.float32 for t in fetched.tensors.values())  # checkpoints stay float32
    assert engine.cache.resident_bytes == fetched.size_bytes * dtype.itemsize // 4


def test_float16_refuses_an_adapter_beyond_its_range(make_engine):
    from app.engine.model_host import ModelHost
    from core.base_model import load_base_model
    from core.errors import Conflict

    settings = make_engine.settings
    publish_adapter(settings, "dt-big", seed=91)
    fetched = fetch_adapter(AdapterRegistry(settings.registry_dir), "dt-big")
    host = ModelHost(load_base_model("embedded", settings, device=torch.device("cpu"), dtype="float16").model)
    host.add_adapter("fits", fetched.config, fetched.tensors)  # ordinary blocks fit: cast once, to float16
    assert {layer.bone_block["fits"].dtype for _, layer in host.bone_model.bone_layers()} == {torch.float16}
    huge = {k: v * 1e6 for k, v in fetched.tensors.items()}  # finite in float32, inf in float16
    with pytest.raises(Conflict) as raised:
        host.add_adapter("huge", fetched.config, huge)
    assert raised.value.code == "unservable_adapter" and "huge" not in host.adapter_slots
