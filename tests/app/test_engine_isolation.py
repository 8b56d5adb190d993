"""One request never fails the batch it shares (issue 13, point 1), on the real engine and the embedded model:
a row whose sampling, streaming or logits fail is answered with its own error while every other row ends
with the text it gets alone; a forward that runs out of device memory is retried with the batch split, and
only a row that fails alone is failed."""

from __future__ import annotations

import time

import pytest
import torch

from app.engine import BASE_MODEL, GenerationRequest, Target
from app.engine.adapter_pool import FetchedAdapter
from app.engine.batch import SamplingParams
from core.errors import GenerationFailed, InvalidRequest, ServiceUnavailable
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter

PROMPTS = ["Once upon a time", "Hi", "A somewhat longer prompt than the others", "Bone adapters", "x"]
N = 12


def greedy(n: int = N, **extra) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, **extra)


def submit(
    engine,
    prompt: str,
    params: SamplingParams | None = None,
    adapter: str | None = None,
    sha: str | None = None,
    **kwargs,
):
    return engine.submit(GenerationRequest(Target(adapter, sha), engine.tokenize(prompt), params or greedy()), **kwargs)


def alone(engine, prompts: list[str], n: int = N) -> list[str]:
    return [submit(engine, p, greedy(n)).future.result(120).text for p in prompts]


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_a_row_whose_streaming_callback_raises_fails_alone(make_engine):
    engine = make_engine(batch_wait_ms=100)
    expected = alone(engine, PROMPTS)
    prefills = engine.scheduler.prefills
    pieces = []

    def broken_client(piece: str) -> None:  # e.g. a stream whose event loop is gone
        pieces.append(piece)
        if len(pieces) == 1:
            raise RuntimeError("Event loop is closed")

    bad = submit(engine, "Tell me", greedy(N), on_text=broken_client)
    good = [submit(engine, p) for p in PROMPTS]
    assert [r.future.result(120).text for r in good] == expected
    error = bad.future.exception(120)
    assert isinstance(error, GenerationFailed) and "Event loop is closed" in error.message
    assert engine.scheduler.failed_rows == 1 and engine.scheduler.prefills - prefills <= 2  # they really shared a batch


def test_non_finite_logits_fail_only_their_row(make_engine):
    """An adapter with NaN weights (as one published before weights were checked) at temperature > 0: the
    loader refuses such weights now, so this one is put into the model directly, as if it had got in."""
    engine = make_engine(batch_wait_ms=100)
    publish_adapter(engine.settings, "nan-src", seed=7)
    registry = AdapterRegistry(engine.settings.registry_dir)
    from app.engine.adapter_pool import fetch_adapter

    source = fetch_adapter(registry, "nan-src")
    tensors = {k: torch.full_like(v, float("nan")) for k, v in source.tensors.items()}
    poisoned = FetchedAdapter("poisoned", "0" * 64, source.config, tensors, source.size_bytes, 0.0)
    engine.scheduler.run_between_steps(lambda: engine.cache.install(poisoned))
    wait_until(lambda: engine.cache.resident(("poisoned", "0" * 64)) is not None)
    expected = alone(engine, PROMPTS)

    bad = submit(
        engine, "Hello", SamplingParams(max_new_tokens=N, temperature=0.8, seed=1), adapter="poisoned", sha="0" * 64
    )
    good = [submit(engine, p) for p in PROMPTS]
    assert [r.future.result(120).text for r in good] == expected
    error = bad.future.exception(120)
    assert isinstance(error, GenerationFailed) and error.code == "non_finite_logits"


def test_an_adapter_with_non_finite_weights_is_refused_at_load(make_engine):
    engine = make_engine()
    info = publish_adapter(engine.settings, "nan-published", seed=8)
    from safetensors.torch import load_file, save_file

    registry = AdapterRegistry(engine.settings.registry_dir)
    weights, _ = registry.verified_weights("nan-published")
    tensors = load_file(str(weights))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("inf")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:  # republished the old way: the registry takes any weights
        save_file(tensors, str(Path(folder) / "adapter_model.safetensors"))
        (Path(folder) / "adapter_config.json").write_text(
            Path(registry.path("nan-published"), "adapter_config.json").read_text()
        )
        info = registry.publish(
            "nan-published", Path(folder), {"base_model": "embedded", "bone": info.bone}, overwrite=True
        )
    bad = submit(engine, "Hello", adapter="nan-published", sha=info.sha256)
    good = submit(engine, "Hello")
    error = bad.future.exception(120)
    assert error.code == "non_finite_adapter" and first in error.message
    assert good.future.result(120).text


@pytest.mark.parametrize(
    "field, params",
    [
        ("seed", SamplingParams(temperature=1.0, seed=2**80)),
        ("seed", SamplingParams(temperature=1.0, seed=-1)),
        ("temperature", SamplingParams(temperature=float("nan"))),
        ("top_p", SamplingParams(top_p=1.5)),
        ("stop", SamplingParams(stop=("",))),
    ],
)
def test_sampling_parameters_are_checked_before_a_row_joins(make_engine, field, params):
    engine = make_engine()
    with pytest.raises(InvalidRequest) as refused:
        submit(engine, "Hi", params)
    assert refused.value.param == field
    assert engine.pending == 0


@pytest.mark.parametrize("ids", [[1, 2, -1], [1, 10**6]])
def test_token_ids_outside_the_vocabulary_never_reach_the_model(make_engine, ids):
    engine = make_engine()
    with pytest.raises(InvalidRequest) as refused:
        engine.submit(GenerationRequest(BASE_MODEL, ids, greedy()))
    assert refused.value.param == "prompt" and "vocabulary" in refused.value.message


# --- device out of memory: a hook on the second decoder layer (the first has already written its cache
#     column, so the failed step must be rolled back) raises torch.OutOfMemoryError -----------------------------
def oom_when(engine, predicate):
    layer = engine.base.model.model.layers[1]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if predicate(hidden, kwargs.get("position_ids")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def test_an_oom_step_is_retried_with_the_batch_split(make_engine):
    engine = make_engine(batch_wait_ms=100)
    expected = alone(engine, PROMPTS)
    handle = oom_when(engine, lambda hidden, positions: hidden.shape[0] > 2)  # room for two rows at a time
    try:
        requests = [submit(engine, p) for p in PROMPTS]
        assert [r.future.result(120).text for r in requests] == expected
    finally:
        handle.remove()
    assert engine.scheduler.failed_rows == 0 and not engine.batch.parked
    assert engine.batch.split_retries["prefill"] > 0 and engine.batch.split_retries["step"] > 0


def test_only_the_row_that_fails_alone_is_failed(make_engine):
    """The long row runs out of memory once it passes position 40 (in a decode step, next to the others):
    it alone is failed, with a 503 that says so; the others finish as they would alone."""
    engine = make_engine(batch_wait_ms=100)
    short = [p for p in PROMPTS if len(p) < 20]
    expected = alone(engine, short)
    long_prompt = "y" * 36  # prefilled fine; its decode steps cross position 40
    handle = oom_when(engine, lambda hidden, positions: positions is not None and int(positions.max()) >= 40)
    try:
        long = submit(engine, long_prompt, greedy(20))
        others = [submit(engine, p) for p in short]
        assert [r.future.result(120).text for r in others] == expected
        error = long.future.exception(120)
    finally:
        handle.remove()
    assert isinstance(error, ServiceUnavailable) and error.code == "device_out_of_memory"
    assert engine.scheduler.failed_rows == 1 and engine.batch.split_retries["step"] >= 2
    assert alone(engine, short) == expected  # and the engine serves on


def test_a_join_that_runs_out_of_memory_half_merged_leaves_the_batch_whole(make_engine, monkeypatch):
    """The KV merge of a newcomer fails after the first layer was merged: that layer goes back to the running
    rows, the newcomer waits (parked) until they leave, and both end with the text they get alone."""
    from app.engine.kv_store import KVLayer

    engine = make_engine()
    long_job, late_job = ("Once upon a time", greedy(60)), ("Hi", greedy(N))
    expected = [submit(engine, *long_job).future.result(120).text, submit(engine, *late_job).future.result(120).text]
    calls, original = [], KVLayer.join

    def join(self, other, count, width, keep):
        if count:  # a newcomer joining running rows (not the first rows of a batch)
            calls.append(1)
            if len(calls) == 2:  # layer 0 merged; layer 1 fails
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, other, count, width, keep)

    monkeypatch.setattr(KVLayer, "join", join)
    long = submit(engine, *long_job)
    wait_until(lambda: len(engine.batch.rows) == 1)
    late = submit(engine, *late_job)
    assert [long.future.result(120).text, late.future.result(120).text] == expected
    assert len(calls) >= 2 and engine.batch.split_retries["prefill"] == 1 and engine.scheduler.failed_rows == 0
