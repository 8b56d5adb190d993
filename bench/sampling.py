"""Per-step sampling time of a batch: the per-row loop vs the batched sampler (issue 15, point 4).

    python -m bench.sampling [--rows 64] [--vocab 32000] [--steps 20] [--repeats 7] [--device cpu|cuda]
                             [--mix mixed|plain|top_p]

"per-row": what a step did until now (one batched argmax and finiteness check brought to the host, then for
each sampled row its own softmax, top-p sort and ``torch.multinomial``, read back with ``int(...)``: a device
sync per row). "batched": ``app.engine.sampling.choose`` (one argmax, one sort for the rows with a top-k or
top-p, the exponential race against per-row seeded noise, one transfer to the host). Both run in the same
process on the same logits. ``--mix mixed``: an eighth of the rows greedy, the rest sampled at temperatures
0.7-1.3, half with a top_p, a quarter with a top_k, most seeded; ``plain``: all sampled, no cut; ``top_p``:
all with top_p 0.9. Prints the median and range over repeats of
the mean time per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from app.engine.sampling import choose, make_generator


@dataclass
class Params:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None


def rows_of(mix: str, n: int) -> list[Params]:
    if mix == "plain":  # every row sampled at temperature 0.8, no cut, seeded
        return [Params(0.8, 1.0, -1, i) for i in range(n)]
    if mix == "top_p":  # every row sampled with a top_p, seeded
        return [Params(0.8, 0.9, -1, i) for i in range(n)]
    return mixed_rows(n)


def mixed_rows(n: int) -> list[Params]:
    rows = []
    for i in range(n):
        if i % 8 == 0:
            rows.append(Params(0.0, 1.0, -1, None))
            continue
        rows.append(
            Params(0.7 + 0.6 * (i % 5) / 4, 0.9 if i % 2 else 1.0, 50 if i % 4 == 3 else -1, None if i % 3 == 0 else i)
        )
    return rows


def per_row_choice(logits: torch.Tensor, p: Params, generator: torch.Generator) -> int:
    """The per-row sampler the engine had (temperature and top_p; top_k applied the same way, by a sort)."""
    logits = logits.float()
    probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)
    if p.top_p < 1.0 or p.top_k > 0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p.top_p
        if p.top_k > 0:
            outside[p.top_k :] = True
        outside[0] = False
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def per_row_step(logits: torch.Tensor, rows: list[Params], generators: list[torch.Generator]) -> list[int]:
    greedy, finite = torch.stack([logits.argmax(dim=-1), torch.isfinite(logits.amax(dim=-1)).long()]).tolist()
    return [
        greedy[j] if p.temperature == 0 else per_row_choice(logits[j], p, generators[j]) for j, p in enumerate(rows)
    ]


def batched_step(logits: torch.Tensor, rows: list[Params], generators: list[torch.Generator | None]) -> list[int]:
    return choose(logits, rows, generators).tokens


def timed(step, logits_steps: list[torch.Tensor], rows, generators, device: torch.device) -> float:
    """Mean seconds per step (the logits already on the device: as after a forward)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for logits in logits_steps:
        step(logits, rows, generators)
    return (time.perf_counter() - t0) / len(logits_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mix", choices=("mixed", "plain", "top_p"), default="mixed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = rows_of(args.mix, args.rows)
    g = torch.Generator().manual_seed(0)
    logits_steps = [(torch.randn(args.rows, args.vocab, generator=g) * 3).to(device) for _ in range(args.steps)]
    old_generators = []
    for j, p in enumerate(rows):
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed if p.seed is not None else 10_000 + j)
        old_generators.append(gen)
    new_generators = [make_generator(p, device) for p in rows]
    for step, gens in ((per_row_step, old_generators), (batched_step, new_generators)):  # warm-up
        timed(step, logits_steps[:2], rows, gens, device)
    old, new = [], []
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
        old.append(timed(per_row_step, logits_steps, rows, old_generators, device))
        new.append(timed(batched_step, logits_steps, rows, new_generators, device))
    sampled = sum(p.temperature > 0 for p in rows)
    print(
        f"sampling per step, {args.mix} mix, {args.rows} rows ({sampled} sampled) x {args.vocab} vocab on {device} "
        f"({torch.get_num_threads()} CPU threads), mean of {args.steps} steps, median [min-max] of {args.repeats}:"
    )
    for name, figures in (("per-row (before)", old), ("batched (after) ", new)):
        print(
            f"  {name}: {statistics.median(figures) * 1e3:8.2f} ms  [{min(figures) * 1e3:.2f}-{max(figures) * 1e3:.2f}]"
        )
    print(f"  speed-up: {statistics.median(old) / statistics.median(new):.1f}x (median over median)")


if __name__ == "__main__":
    main()
