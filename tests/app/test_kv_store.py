"""The KV cache is written in place (issue 15, point 3), on the real engine and its embedded tiny Llama: a
decode step writes its own column and copies nothing else, a newcomer that fits joins by writing only its
columns, a row leaving moves only the rows that fill its slot, and only a newcomer wider than the room kept
for it lays the cache out again (counted in /metrics). Every row still ends with what it generates alone."""

from __future__ import annotations

import time

import pytest
import torch
from prometheus_client import REGISTRY

from app.engine import BASE_MODEL, GenerationRequest, InferenceEngine
from app.engine.batch import SamplingParams
from app.engine.kv_store import KVCache


def submit(engine: InferenceEngine, prompt: str, n: int):
    params = SamplingParams(max_new_tokens=n, temperature=0)
    return engine.submit(GenerationRequest(BASE_MODEL, engine.tokenize(prompt), params))


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def staggered(engine: InferenceEngine, first, joins: dict[int, tuple[str, int]]):
    """Run ``first`` and submit ``joins[k]`` from inside its k-th decode step (so the newcomer joins right after
    it). Returns the requests and, before every decode step, (rows, the batch's width, the storage's data
    pointers, bytes written and copied so far, re-layouts so far)."""
    seen: list[tuple[int, int, list[int], int, int, int]] = []
    requests: list = []

    def hook(module, args, kwargs):
        tokens, cache = kwargs.get("input_ids"), kwargs.get(engine._cache_arg)
        if tokens is None or tokens.shape[1] != 1 or not isinstance(cache, KVCache):
            return
        pointers = [t.data_ptr() for layer in cache.kv_layers for t in layer.storage]
        stats = cache.stats
        width = kwargs["attention_mask"].shape[1] - 1
        seen.append((tokens.shape[0], width, pointers, stats.written_bytes, stats.copied_bytes, stats.relayouts))
        if len(seen) in joins:
            prompt, n = joins[len(seen)]
            requests.append(submit(engine, prompt, n))

    handle = engine.base.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        requests.insert(0, submit(engine, *first))
        wait_until(lambda: all(r.future.done() for r in requests), 120)
    finally:
        handle.remove()
    assert len(requests) == 1 + len(joins), "the first row ended before every newcomer arrived"
    return requests, seen


def column_bytes(engine: InferenceEngine) -> int:
    """Bytes one row's column takes across every layer (keys and values)."""
    config = engine.base.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4  # fp32


def relayouts(reason: str) -> float:
    return REGISTRY.get_sample_value("bone_engine_kv_relayouts_total", {"reason": reason}) or 0.0


def test_decode_steps_and_a_join_that_fits_copy_no_existing_column(make_engine):
    engine = make_engine()
    first, joins = ("Once upon a time, in a land of bones", 40), {4: ("Hi", 8), 9: ("A bone", 6)}
    expected = [submit(engine, *job).future.result(120).token_ids for job in [first, *joins.values()]]
    requests, seen = staggered(engine, first, joins)
    assert [r.future.result(0).token_ids for r in requests] == expected
    assert max(rows for rows, *_ in seen) == 3  # both newcomers ran next to the first row
    # the storage was never laid out again: not on a step, not on the joins (narrower than the batch), not on
    # a leave
    assert len({tuple(pointers) for _, _, pointers, *_ in seen}) == 1
    column = column_bytes(engine)
    for before, after in zip(seen, seen[1:]):
        rows, width = before[0], before[1]
        written, copied, laid_out = (after[k] - before[k] for k in (3, 4, 5))
        assert laid_out == 0
        if after[0] >= rows:  # nothing that was in the cache was copied again
            assert copied == 0
        else:  # a row left: at most the last row moved into its slot
            assert copied <= (width + 1) * column
        if after[0] == rows:  # a plain step: its own column for each row, whatever the width
            assert written == rows * column, (rows, width, written)
        elif after[0] > rows:  # a join: the step's column, and the newcomer's own columns only
            assert rows * column < written <= rows * column + (after[0] - rows) * (after[1] + 1) * column
    assert seen[-1][1] > 40  # the width did grow, and no step's work grew with it


def test_rows_leaving_move_only_the_rows_that_fill_their_slots(make_engine):
    """Three rows; the first (slot 0) finishes first: the last row moves into its slot (one row's columns
    copied), the middle row stays where it is."""
    engine = make_engine(batch_wait_ms=200)
    jobs = [("Hi", 4), ("Once upon a time", 30), ("A bone and a bone", 30)]
    expected = [submit(engine, *job).future.result(120).token_ids for job in jobs]
    requests, seen = staggered(engine, jobs[0], {1: jobs[1], 2: jobs[2]})
    assert [r.future.result(0).token_ids for r in requests] == expected
    column = column_bytes(engine)
    drops = [(b, a) for b, a in zip(seen, seen[1:]) if a[0] < b[0]]
    assert drops, "no row left while others ran"
    before, after = drops[0]
    assert (before[0], after[0]) == (3, 2)
    assert after[4] - before[4] == column * after[1]  # one row's live columns moved, at the width it left
    assert after[5] == before[5]


def test_a_newcomer_wider_than_the_room_kept_for_it_lays_the_cache_out_again(make_engine):
    engine = make_engine()
    first, joins = ("Hi", 30), {3: ("A much longer prompt than the first one, by far: " * 2, 5)}
    expected = [submit(engine, *job).future.result(120).token_ids for job in [first, *joins.values()]]
    before = relayouts("join")
    requests, seen = staggered(engine, first, joins)
    assert [r.future.result(0).token_ids for r in requests] == expected
    layers = engine.base.model.config.num_hidden_layers
    assert relayouts("join") - before == layers  # each layer once, for the wider newcomer
    assert len({tuple(pointers) for _, _, pointers, *_ in seen}) == 2  # moved once, then never again


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_a_sliding_window_computes_what_transformers_cache_does_and_stays_a_few_windows_wide(family):
    """Two left-padded rows decode far past the window with ``KVCache`` and with transformers' own
    ``DynamicCache``: the logits agree at every step; the sliding layers' buffers stay a few windows wide and
    their columns move back to the start once every ~window steps (amortised: under one column per step)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from app.engine import kv_cache
    from tests.app.test_engine_cache_kinds import WINDOW, _configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_configs()[family]()).eval()
    windows = kv_cache.windows(model)
    assert windows is not None and WINDOW in windows
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # the second row is shorter: left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours, theirs = kv_cache.new_cache(windows), DynamicCache(config=model.config)
    steps = 60
    with torch.no_grad():
        for cache in (ours, theirs):
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        tokens, step_mask, last = ids[:, -1:], mask, positions[:, -1:]
        for _ in range(steps):
            step_mask = torch.cat([step_mask, step_mask.new_ones((2, 1))], dim=1)
            last = last + 1
            outs = [
                model(input_ids=tokens, attention_mask=step_mask, position_ids=last, cache=c, use_cache=True).logits
                for c in (ours, theirs)
            ]
            ours.settle()
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
            tokens = outs[1][:, -1:].argmax(-1)
    sliding = [layer for layer in ours.kv_layers if layer.is_sliding]
    assert sliding and all(layer.keys.shape[-2] == WINDOW - 1 for layer in sliding)
    assert all(layer.storage[0].shape[-2] <= 20 + 2 * WINDOW + 16 for layer in sliding)
    heads, head_dim = sliding[0].storage[0].shape[1], sliding[0].storage[0].shape[-1]
    column = 2 * 2 * heads * head_dim * 4  # both rows, keys and values, fp32
    full = len(ours.kv_layers) - len(sliding)
    # full layers: laid out once when the exact prefill buffer first ran out of room, then every doubling
    assert ours.stats.copied_bytes <= len(sliding) * steps * column + full * 4 * (20 + steps) * column
