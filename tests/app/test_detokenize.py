"""Incremental detokenization equals a full decode at every step, and stop strings found on the new text only
cut where a search of the whole text would (the embedded byte-level tokenizer: one token per byte, so a
multi-byte character is split across tokens)."""

from __future__ import annotations

import random

import pytest

from app.engine.batch import Row, SamplingParams
from app.engine.detokenize import IncrementalDetokenizer
from core.base_model import _byte_level_tokenizer
from core.names import BASE_ADAPTER

TOKENIZER = _byte_level_tokenizer()
EOS = TOKENIZER.eos_token_id
SPECIAL = [TOKENIZER.bos_token_id, TOKENIZER.pad_token_id]


def full_decode(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def tokens(text: str) -> list[int]:
    return list(text.encode("utf-8"))  # the byte-level tokenizer's ids are the bytes


TEXTS = [
    "plain ascii text",
    "naïve café — 2 €",
    "你好，世界。漢字とかな",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "mixed: a😀b中c\u00e9d\U0001f600",
    "\ufffd a real replacement char, then 中",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode_at_every_step(text):
    ids = tokens(text)
    detok = IncrementalDetokenizer(full_decode)
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
        assert detok.text == full_decode(ids[:n])
    assert detok.text == text


@pytest.mark.parametrize("seed", range(20))
def test_incremental_equals_full_decode_on_random_bytes_and_special_tokens(seed):
    """What an untrained model emits: invalid UTF-8, lone continuation bytes, truncated characters, special
    tokens in between."""
    rng = random.Random(seed)
    pool = tokens("".join(TEXTS)) + list(range(0x80, 0x100)) + SPECIAL * 10
    ids = [rng.choice(pool) for _ in range(300)]
    detok = IncrementalDetokenizer(full_decode)
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
        assert detok.text == full_decode(ids[:n]), n


def reference(
    ids: list[int], stops: tuple[str, ...], max_new_tokens: int, decode=full_decode
) -> tuple[str, str | None, list[str]]:
    """Today's behaviour, restated: a full decode and a search of the whole text at every token."""
    from app.engine.batch import _safe_end

    text, emitted, pieces, generated = "", 0, [], []
    for token in ids:
        generated.append(token)
        if token == EOS:
            reason = "stop"
            break
        text = decode(generated)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            text, reason = text[: min(hits)], "stop"
            break
        if len(generated) >= max_new_tokens:
            reason = "length"
            break
        end = _safe_end(text, stops)
        if end > emitted:
            pieces.append(text[emitted:end])
            emitted = end
    else:
        return text, None, pieces
    if len(text) > emitted:
        pieces.append(text[emitted:])
    return text, reason, pieces


def run_row(
    ids: list[int], stops: tuple[str, ...], max_new_tokens: int, decode=full_decode
) -> tuple[str, str | None, list[str]]:
    pieces: list[str] = []
    row = Row(
        prompt_ids=[1],
        adapter_slot=BASE_ADAPTER,
        eos_ids=frozenset({EOS}),
        params=SamplingParams(max_new_tokens=max_new_tokens, stop=stops),
        decode=decode,
        on_text=pieces.append,
    )
    for token in ids:
        if row.finished:
            break
        row.push(token)
    return row.text, row.finish_reason, pieces


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello 世界 and more", ("世界",), "hello "),  # a stop whose characters are split across tokens
        ("hello 世界 and more", ("o 世",), "hell"),  # spanning ascii and a multi-byte character
        ("😀 at the start", ("😀",), ""),  # the very first character stops
        ("stop at once", ("s",), ""),
        ("abc STOP def END", ("END", "STOP"), "abc "),  # several stops: the earliest wins, not the first listed
        ("abc STOP def END", ("STOP", "ST", "ABC"), "abc "),  # overlapping stops
        ("a long text " * 20 + "終わり tail", ("終わり",), "a long text " * 20),  # found far from the start
        ("no stop here 👍🏽", ("zzz", "👎"), "no stop here 👍🏽"),
        ("partial 👍 vs 👍🏽", ("👍🏽",), "partial 👍 vs "),  # a stop that begins like an earlier character
    ],
)
def test_stop_strings_cut_like_a_full_search(text, stops, expected):
    ids = tokens(text)
    got = run_row(ids, stops, max_new_tokens=len(ids) + 1)
    assert got == reference(ids, stops, max_new_tokens=len(ids) + 1)
    assert got[0] == expected
    assert "".join(got[2]) == expected


@pytest.mark.parametrize("seed", range(30))
def test_row_matches_todays_behaviour_on_random_streams(seed):
    rng = random.Random(seed)
    vocab = tokens("ab 中😀") + [0xE4, 0xF0, 0x9F, 0x80] + SPECIAL
    stops = tuple(rng.choice(["a b", "中", "😀a", "b", "ab中", "\ufffd", "aaaa"]) for _ in range(rng.randint(0, 3)))
    ids = [rng.choice(vocab) for _ in range(rng.randint(1, 120))] + [EOS]
    budget = rng.randint(1, 130)
    text, reason, pieces = run_row(ids, stops, budget)
    assert (text, reason, pieces) == reference(ids, stops, budget)
    assert "".join(pieces) == text  # streamed chunks add up to the final text


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_chunks_concatenate_to_the_final_text(text):
    ids = tokens(text)
    got_text, reason, pieces = run_row(ids + [EOS], (), max_new_tokens=len(ids) + 5)
    assert reason == "stop" and got_text == text and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text  # never half a character


def cleaning_decode(ids: list[int]) -> str:
    """A tokenizer that cleans up spaces (HF's clean_up_tokenization_spaces): a new token rewrites text
    before it, which a window alone cannot see."""
    return full_decode(ids).replace(" .", ".").replace(" ,", ",")


@pytest.mark.parametrize("text", ["a . b , c .. d", "end .", " . , .", "中 .😀 ,"])
def test_a_token_that_rewrites_earlier_text_resyncs(text):
    ids = tokens(text)
    detok = IncrementalDetokenizer(cleaning_decode)
    for n in range(1, len(ids) + 1):
        detok.update(ids[:n])
        assert detok.text == cleaning_decode(ids[:n])


@pytest.mark.parametrize("text, stops", [("a b . c", ("b.",)), ("x , y . z", ("y.", "zz")), ("a . b", ("q",))])
def test_stop_found_after_a_resync(text, stops):
    ids = tokens(text)
    got = run_row(ids, stops, len(ids) + 1, decode=cleaning_decode)
    assert got[:2] == reference(ids, stops, len(ids) + 1, decode=cleaning_decode)[:2]
