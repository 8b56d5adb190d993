"""Per-step detokenize + stop-string cost of one row at N generated tokens (issue 15, point 4).

    python -m bench.detokenize [--tokens 2000] [--window 200] [--repeats 5]

"before": what a row did until now at every token (decode all its tokens, search the whole text for every
stop, work out what may stream). "after": ``Row.push`` (incremental detokenization, stop search on the new
text plus the longest stop's tail). Both run the embedded byte-level tokenizer on the same mixed
ASCII / CJK / emoji text with two stop strings that never occur, and time the last ``--window`` steps of a
``--tokens``-token row: the cost at that length, per row per step. Prints the median over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

from app.engine.batch import Row, SamplingParams, _first_stop, _safe_end
from core.base_model import _byte_level_tokenizer
from core.names import BASE_ADAPTER

STOPS = ("</answer>", "\n\nUser:")


def sample_ids(n: int) -> list[int]:
    text = "The quick brown fox 跳过了懒狗 😀 and then some more words. " * (n // 40 + 1)
    return list(text.encode("utf-8"))[:n]


def before(ids: list[int], decode, window: int) -> float:
    """Seconds per step over the last ``window`` steps, the old way."""
    emitted, start = 0, len(ids) - window
    t0 = 0.0
    for n in range(1, len(ids) + 1):
        if n == start + 1:
            t0 = time.perf_counter()
        text = decode(ids[:n])
        if _first_stop(text, STOPS) is not None:
            raise AssertionError("a stop string occurred")
        end = _safe_end(text, STOPS)
        if end > emitted:
            emitted = end
    return (time.perf_counter() - t0) / window


def after(ids: list[int], decode, window: int) -> float:
    pieces: list[str] = []
    row = Row(
        prompt_ids=[1],
        adapter_slot=BASE_ADAPTER,
        eos_ids=frozenset(),
        decode=decode,
        on_text=pieces.append,
        params=SamplingParams(max_new_tokens=len(ids) + 1, stop=STOPS),
    )
    start = len(ids) - window
    t0 = 0.0
    for n, token in enumerate(ids, 1):
        if n == start + 1:
            t0 = time.perf_counter()
        row.push(token)
    elapsed = (time.perf_counter() - t0) / window
    if row.text != decode(ids) or not row.text.startswith("".join(pieces)):
        raise AssertionError("incremental text differs from a full decode")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = _byte_level_tokenizer()

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    ids = sample_ids(args.tokens)
    old = statistics.median(before(ids, decode, args.window) for _ in range(args.repeats))
    new = statistics.median(after(ids, decode, args.window) for _ in range(args.repeats))
    print(f"detokenize + stop per row per step at {args.tokens} tokens (median of {args.repeats}):")
    print(f"  before (full decode): {old * 1e6:8.1f} us")
    print(f"  after (incremental):  {new * 1e6:8.1f} us   ({old / new:.0f}x less)")


if __name__ == "__main__":
    main()
