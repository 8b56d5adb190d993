"""Every cache kind joins mid-flight (issue 15, point 5), on the real engine and tiny models built from config:
sliding-window caches (Mistral, Phi-3) and hybrid ones (Gemma 2, Gemma 3: local and global layers
alternating) take newcomers into a running batch like Llama, with prompts and answers longer than the window,
and every row ends with the text it gets alone. A failed step is undone exactly even when the window had
already slid. A cache that cannot take rows in (LFM2's convolution state) drains instead, and the engine
says which mode it runs in, in the log and in /metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from app.engine import BASE_MODEL, GenerationRequest, InferenceEngine, kv_cache
from app.engine.batch import SamplingParams
from core.base_model import _byte_level_tokenizer, load_base_model
from core.registry import AdapterRegistry
from core.settings import Settings

WINDOW = 8
# Prompts (one token per byte) shorter and longer than the window. Each scenario: the first job runs alone,
# then each newcomer is submitted from inside the decode step it names, so it joins right after that step.
NARROWER = (
    ("The quick brown fox jumps over the lazy dog", 40),  # outlives every newcomer, all narrower
    {2: ("Hi", 12), 5: ("A prompt longer than the window", 16), 8: ("Bone", 20), 10: ("x" * 19, 9)},
)
WIDER = (
    ("Hi", 24),  # a newcomer wider than the batch, which leaves it to be trimmed below the window
    {1: ("The quick brown fox jumps over the lazy dog", 3), 6: ("ok", 5)},
)


def _configs() -> dict:
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config

    common = dict(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
    )
    return {
        "mistral": lambda: MistralConfig(sliding_window=WINDOW, **common),
        "phi3": lambda: Phi3Config(sliding_window=WINDOW, **common),
        "gemma2": lambda: Gemma2Config(sliding_window=WINDOW, head_dim=16, **common),  # sliding, global, ...
        "gemma3": lambda: Gemma3TextConfig(sliding_window=WINDOW, head_dim=16, sliding_window_pattern=2, **common),
    }


def build_model(config, target: Path) -> Path:
    """A tiny random model of ``config``'s family with the embedded byte-level tokenizer, saved like a hub model."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=257, eos_token_id=258, pad_token_id=256)
    model.save_pretrained(target)
    _byte_level_tokenizer().save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache-kinds")
    return {name: build_model(config(), root / name) for name, config in _configs().items()}


@pytest.fixture
def serve(tmp_path: Path):
    engines: list[InferenceEngine] = []

    def start(model_dir: Path, **overrides) -> InferenceEngine:
        settings = Settings(
            data_dir=tmp_path / "data",
            base_model=str(model_dir),
            **{"batch_wait_ms": 20, "max_prompt_tokens": 256, **overrides},
        )
        base = load_base_model(settings.base_model, settings, device=torch.device("cpu"), dtype=settings.dtype)
        engine = InferenceEngine(base, AdapterRegistry(settings.registry_dir), settings)
        engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.stop()


def submit(engine: InferenceEngine, prompt: str, n: int):
    params = SamplingParams(max_new_tokens=n, temperature=0)
    return engine.submit(GenerationRequest(BASE_MODEL, engine.tokenize(prompt), params))


def alone(engine: InferenceEngine, jobs) -> list[list[int]]:
    return [submit(engine, *job).future.result(120).token_ids for job in jobs]


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def staggered(engine: InferenceEngine, first, joins: dict[int, tuple[str, int]]):
    """Run ``first``, and submit ``joins[k]`` from inside its k-th decode step (on the model thread, so the
    newcomer joins right after that step, whatever the machine's speed). Returns the requests in that order
    and, for every decode step, (rows, the batch's width, each cache layer as (sliding, columns held,
    cumulative length))."""
    seen: list[tuple[int, int, list[tuple[bool, int, int]]]] = []
    requests: list = []
    ids = {step: engine.tokenize(prompt) for step, (prompt, _) in joins.items()}

    def hook(module, args, kwargs):
        tokens, cache = kwargs.get("input_ids"), kwargs.get(engine._cache_arg)
        if tokens is None or tokens.shape[1] != 1 or cache is None:
            return
        width = kwargs["attention_mask"].shape[1] - 1
        held = [
            (kv_cache._is_sliding(layer), layer.keys.shape[-2], getattr(layer, "cumulative_length", width))
            for layer in cache.layers
            if getattr(layer, "keys", None) is not None
        ]
        seen.append((tokens.shape[0], width, held))
        if len(seen) in joins:
            params = SamplingParams(max_new_tokens=joins[len(seen)][1], temperature=0)
            requests.append(engine.submit(GenerationRequest(BASE_MODEL, ids[len(seen)], params)))

    handle = engine.base.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        requests.insert(0, submit(engine, *first))
        wait_until(lambda: all(r.future.done() for r in requests), 120)
    finally:
        handle.remove()
    assert len(requests) == 1 + len(joins), "the first row ended before every newcomer arrived"
    return requests, seen


def metric(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@pytest.mark.parametrize("family", sorted(_configs()))
def test_rows_join_a_running_batch_of_every_cache_kind_and_match_each_request_alone(serve, model_dirs, family):
    engine = serve(model_dirs[family])
    assert engine.join_mode == kv_cache.JOINS
    assert metric("bone_engine_continuous_batching", mode="joins") == 1
    assert metric("bone_engine_continuous_batching", mode="drain") == 0
    states = {}
    for scenario, (first, joins) in {"narrower": NARROWER, "wider": WIDER}.items():
        expected = alone(engine, [first, *joins.values()])
        assert len(expected[0]) == first[1], "the first row must outlive the others (it met end-of-sequence)"
        before = engine.scheduler.joins
        requests, states[scenario] = staggered(engine, first, joins)
        assert [r.future.result(0).token_ids for r in requests] == expected
        assert engine.scheduler.joins - before == len(joins)  # every newcomer joined a running batch
    # Before every step each layer held what its kind keeps for the batch's width: a sliding one the last
    # WINDOW - 1 columns (fewer if the batch is narrower), with the width as its length; a full one all.
    for _, width, held in states["narrower"] + states["wider"]:
        assert any(sliding for sliding, _, _ in held)
        for sliding, columns, length in held:
            assert (columns, length) == ((min(width, WINDOW - 1), width) if sliding else (width, width))
    assert min(width for rows, width, _ in states["narrower"] if rows > 1) > WINDOW  # joined a slid window
    widths = [width for _, width, _ in states["wider"]]
    widest = widths.index(max(widths))
    assert widths[0] < WINDOW - 1 < max(widths) and min(widths[widest:]) < WINDOW - 1  # widened, then trimmed


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_failed_step_after_the_window_slid_is_undone_exactly(serve, model_dirs, family):
    """Decode steps of more than two rows run out of memory on the second layer, after the first (a sliding
    one) appended its column and pushed its oldest out of the window: the step is rolled back, retried
    split, and every row ends as it would alone."""
    engine = serve(model_dirs[family], batch_wait_ms=200)
    jobs = [NARROWER[0], *NARROWER[1].values()]
    expected = alone(engine, jobs)
    layer = engine.base.model.model.layers[1]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] > 2 and hidden.shape[1] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        requests = [submit(engine, *job) for job in jobs]
        assert [r.future.result(120).token_ids for r in requests] == expected
    finally:
        handle.remove()
    assert engine.batch.split_retries["step"] > 0 and engine.scheduler.failed_rows == 0


def test_a_cache_that_cannot_take_rows_in_drains_and_says_so(serve, tmp_path_factory, caplog):
    """LFM2 keeps a convolution state per row, not columns a newcomer could be padded into: a request that
    arrives while another runs waits for it to finish, and the engine said at start that it would."""
    from transformers import Lfm2Config

    config = Lfm2Config(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
        layer_types=["conv", "full_attention"],
    )
    model_dir = build_model(config, tmp_path_factory.mktemp("lfm2") / "lfm2")
    with caplog.at_level(logging.INFO, logger="app.engine.kv_cache"):
        engine = serve(model_dir)
    assert engine.join_mode == kv_cache.DRAIN
    assert "continuous batching is off" in caplog.text and "conv" in caplog.text
    assert metric("bone_engine_continuous_batching", mode="drain") == 1
    assert metric("bone_engine_continuous_batching", mode="joins") == 0
    LONG, LATE = NARROWER[0], NARROWER[1][2]
    expected = alone(engine, [LONG, LATE])
    joins = engine.scheduler.joins
    requests, seen = staggered(engine, LONG, {3: LATE})
    assert [r.future.result(0).token_ids for r in requests] == expected
    assert engine.scheduler.joins == joins and {rows for rows, _, _ in seen} == {1}  # one row at a time


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_prompt_longer_than_the_window_prefilled_in_chunks_generates_what_it_does_at_once(serve, model_dirs, family):
    """Chunks shorter and longer than the window: each sees the window's kept columns and its own."""
    job = ("The quick brown fox jumps over the lazy dog", 12)
    whole = alone(serve(model_dirs[family], prefill_chunk=0), [job])
    for chunk in (5, 11):
        engine = serve(model_dirs[family], prefill_chunk=chunk)
        assert engine.batch.prefill_chunk == chunk  # sliding-window models enter in chunks too
        assert alone(engine, [job]) == whole
        assert engine.batch.chunks >= len(engine.tokenize(job[0])) // chunk
