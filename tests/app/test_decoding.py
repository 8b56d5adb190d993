"""The per-row decode state: stop strings, end of sequence, token budgets, streaming pieces, sampling."""

from __future__ import annotations

import pytest
import torch

from app.engine.batch import Row, SamplingParams, _safe_end
from app.engine.sampling import choose
from core.names import BASE_ADAPTER

EOS = 0


def row(stop=(), max_new_tokens=10, on_text=None, temperature=0.0, top_p=1.0, seed=None) -> Row:
    # token t decodes to chr(t): ids 97.. are letters
    return Row(
        prompt_ids=[1],
        adapter_slot=BASE_ADAPTER,
        eos_ids=frozenset({EOS}),
        params=SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop)
        ),
        decode=lambda ids: "".join(chr(t) for t in ids if t != EOS),
        on_text=on_text,
    )


def feed(r: Row, text: str) -> Row:
    for ch in text:
        if r.finished:
            break
        r.push(ord(ch))
    return r


@pytest.mark.parametrize(
    "stop, fed, text, reason",
    [
        ((), "abc", "abc", None),
        (("c",), "abcd", "ab", "stop"),
        (("bc", "x"), "abcd", "a", "stop"),
        (("cd",), "abcdef", "ab", "stop"),  # a stop spanning two tokens
        (("zz",), "abcdefghijk", "abcdefghij", "length"),
    ],
)
def test_stop_strings_and_budget(stop, fed, text, reason):
    r = feed(row(stop=stop), fed)
    assert (r.text, r.finish_reason) == (text, reason)


def test_end_of_sequence_is_not_text():
    r = row()
    feed(r, "ab")
    r.push(EOS)
    assert (r.text, r.finish_reason, len(r.generated)) == ("ab", "stop", 3)


def test_stream_pieces_add_up_and_never_show_a_stop():
    pieces: list[str] = []
    r = feed(row(stop=("lo w",), on_text=pieces.append, max_new_tokens=50), "hello world")
    assert r.text == "hel" and "".join(pieces) == "hel"
    pieces.clear()
    r = feed(row(stop=("xyz",), on_text=pieces.append, max_new_tokens=5), "abxyq")
    assert "".join(pieces) == r.text == "abxyq"


@pytest.mark.parametrize(
    "text, stops, end",
    [
        ("hello wo", ("world",), 6),
        ("hello", ("world",), 5),
        ("ab\ufffd", (), 2),
        ("abc", ("c", "bcd"), 1),
        ("hello 世\ufffd", ("世界",), 6),  # a partial character is held back, and so is the stop prefix before it
    ],
)
def test_safe_end_holds_back_what_may_still_change(text, stops, end):
    assert _safe_end(text, stops) == end


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])

    def draws(r: Row, n: int) -> list[int]:  # a row's tokens over n steps, its generator carried across them
        return [choose(logits[None], [r.params], [r.generator(logits.device)]).tokens[0] for _ in range(n)]

    assert draws(row(temperature=1.0, seed=1), 20) == draws(row(temperature=1.0, seed=1), 20)
    assert set(draws(row(temperature=1.0, seed=3, top_p=0.5), 50)) == {1}  # token 1 alone holds >= 50% of the mass
    assert set(draws(row(temperature=1.0, seed=3, top_p=0.99), 200)) == {1, 2}
    assert draws(row(temperature=0), 1) == [1]
