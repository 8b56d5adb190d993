"""Host memory a training rank spends on the tokenized dataset: Python lists pickled into each rank (the old
path) vs the int32 Arrow file every rank memory-maps (``worker.tokenized``).

    python bench/data_memory.py [--rows 200000] [--ranks 2] [--mean-tokens 64] [--vocab 151936]

Builds ``--rows`` examples (prompt masked with -100, token ids drawn from a Qwen2-sized vocabulary, so ids are
real int objects and not CPython's cached small ints, as a byte-level toy tokenizer would give), writes them
with ``ExampleWriter`` (what the worker's tokenizing streams into), then starts ``--ranks`` spawned processes
per path, as torch elastic starts ranks. Each rank records its RSS after its imports, receives the dataset the
way the path hands it over (the pickle of the examples: the whole lists, or the Arrow file's path), then makes
one full pass over it, collating micro-batches of 8 as training does, and records its RSS again.

Figures per rank: the RSS increase (anonymous and file-backed parts apart), its peak increase, and the
increase over the token bytes (input_ids + labels as int32: what the data is worth). Target: the Arrow path
stays <= 1.2x. The file-backed part is the page cache of the one file, shared by every rank on the machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIB = 1024 * 1024


def status_kib(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in fields:
                values[name] = int(rest.split()[0])
    return values


def build_examples(rows: int, mean_tokens: int, vocab: int, seed: int):
    import numpy as np

    from worker.data import IGNORE_INDEX, Example

    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_tokens // 2, mean_tokens * 3 // 2 + 1, size=rows)
    examples = []
    for n in lengths.tolist():
        ids = rng.integers(0, vocab, size=n).tolist()
        prompt = n // 3
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))  # as tokenize_rows builds them
    return examples


def rank(payload_file: str, results, index: int) -> None:
    """One rank: baseline after imports, then receive the dataset, pass over it, measure."""
    import datasets  # noqa: F401 - imported before the baseline: what every rank imports anyway
    import torch

    from worker.batches import collate
    from worker.data import Example

    torch.set_num_threads(1)
    collate([Example([1, 2], [1, 2])] * 8, 0, torch.device("cpu"))  # torch's first-call allocations
    fields = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    before = status_kib(*fields)
    with open(payload_file, "rb") as f:  # what spawn's pipe delivers: the pickle, read whole, then loaded
        payload = f.read()
    examples = pickle.loads(payload)
    del payload
    for start in range(0, len(examples), 8):
        collate(list(examples[start : start + 8]), 0, torch.device("cpu"))
    after = status_kib(*fields)
    results.put((index, {k: (after[k] - before[k]) * 1024 for k in fields}, len(examples)))


def measure(examples_obj, ranks: int, workdir: Path) -> tuple[list[dict[str, int]], int, float]:
    payload = workdir / "payload.pickle"
    started = time.perf_counter()
    payload.write_bytes(pickle.dumps(examples_obj, protocol=pickle.HIGHEST_PROTOCOL))
    pickled = payload.stat().st_size
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=rank, args=(str(payload), results, i)) for i in range(ranks)]
    for p in procs:
        p.start()
    got = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    return [g[1] for g in sorted(got, key=lambda g: g[0])], pickled, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mean-tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from worker.tokenized import write_examples

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        workdir = Path(tmp)
        examples = build_examples(args.rows, args.mean_tokens, args.vocab, args.seed)
        tokens = sum(len(ex.input_ids) for ex in examples)
        started = time.perf_counter()
        arrow = write_examples(examples, workdir / "train.arrow")
        written = time.perf_counter() - started
        token_bytes = tokens * 4 * 2  # input_ids + labels, int32
        print(
            f"{args.rows:,} rows, {tokens:,} tokens; token bytes (int32 input_ids + labels) "
            f"{token_bytes / MIB:.1f} MiB; Arrow file {arrow.path.stat().st_size / MIB:.1f} MiB "
            f"(written in {written:.1f} s); {args.ranks} ranks per path"
        )
        print(
            f"{'path':<22} {'pickle':>10} {'RSS +/rank':>11} {'anon':>9} {'file':>9} {'peak +':>9} "
            f"{'x token bytes':>14} {'bytes/token':>12}"
        )
        for label, obj in (("old: lists pickled", examples), ("new: Arrow mmap", arrow)):
            per_rank, pickled, seconds = measure(obj, args.ranks, workdir)
            for i, r in enumerate(per_rank):
                print(
                    f"{label + f' r{i}':<22} {pickled / MIB:>8.1f}Mi {r['VmRSS'] / MIB:>9.1f}Mi "
                    f"{r['RssAnon'] / MIB:>7.1f}Mi {r['RssFile'] / MIB:>7.1f}Mi {r['VmHWM'] / MIB:>7.1f}Mi "
                    f"{r['VmRSS'] / token_bytes:>14.2f} {r['VmRSS'] / tokens:>12.1f}"
                )
            print(f"  ({seconds:.1f} s for the hand-over and one pass on every rank)")


if __name__ == "__main__":
    main()
