"""Decode step time against the KV cache's width: transformers' ``DynamicCache`` (a ``torch.cat`` of the whole
cache per layer per step) vs the engine's ``KVCache`` (the step's column written in place), same model, same
rows, same run.

    python bench/kv_cache.py --model small --rows 8 --widths 128,256,512,1024,2048,4096 [--device cuda]

For each width both caches are filled with the same random keys and values (rows x width columns; the model's
prefill is not what is measured), then ``--steps`` decode steps run through the model and each step is timed
(median). Printed per width: the step time with each cache, their ratio, and the cache's own work per step
alone (the ``update`` calls of one step, without the model: the copy the old cache makes, the in-place write
of the new). Beyond attention's own cost (which reads every column, with either cache), the new cache's step
time should not grow with the width; the old one's copy does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.kv_store import KVCache, Plan  # noqa: E402
from bench.models import build_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def filled(kind: str, model, rows: int, width: int, steps: int, device: torch.device, dtype: torch.dtype):
    """A cache of ``kind`` holding ``rows`` x ``width`` random columns in every layer."""
    from transformers import DynamicCache

    config = model.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    gen = torch.Generator(device="cpu").manual_seed(width)
    if kind == "old":
        cache = DynamicCache(config=config)
    else:
        cache = KVCache([None] * layers, Plan(max_rows=rows, right=steps + 1))
    for layer in range(layers):
        keys = torch.randn((rows, heads, width, head_dim), generator=gen).to(device, dtype)
        values = torch.randn((rows, heads, width, head_dim), generator=gen).to(device, dtype)
        cache.update(keys, values, layer)
    return cache


def decode_steps(model, cache, rows: int, width: int, steps: int, device: torch.device) -> list[float]:
    """Seconds per decode step (all rows) over ``steps`` steps, from ``width`` columns."""
    times = []
    ids = torch.randint(0, model.config.vocab_size, (rows, 1), device=device)
    for i in range(steps):
        mask = torch.ones((rows, width + i + 1), dtype=torch.long, device=device)
        positions = torch.full((rows, 1), width + i, dtype=torch.long, device=device)
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        ids = out.logits[:, -1:].argmax(-1)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def update_only(cache, model, rows: int, steps: int, device: torch.device, dtype: torch.dtype) -> list[float]:
    """Seconds per step of the cache's own work: one column appended to every layer, no model."""
    config = model.config
    heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    column = torch.randn((rows, heads, 1, head_dim), device=device, dtype=dtype)
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        for layer in range(config.num_hidden_layers):
            cache.update(column, column, layer)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=["tiny", "small"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--widths", default="128,256,512,1024,2048,4096")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    widths = [int(w) for w in args.widths.split(",")]
    model = build_model(args.model, seed=0, dtype=dtype, max_position_embeddings=max(widths) + args.steps + 8)
    model.to(device).eval()
    print(f"model {args.model}, {args.rows} rows, {args.steps} steps per width, {device}, {args.dtype}")
    print(f"{'width':>6} | {'step old ms':>11} {'step new ms':>11} {'old/new':>7} | {'cache old ms':>12} "
          f"{'cache new ms':>12} {'old/new':>7}")  # fmt: skip
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for width in widths:
        step, own = {}, {}
        for kind in ("old", "new"):
            cache = filled(kind, model, args.rows, width, 2 * args.steps + 2, device, dtype)
            decode_steps(model, cache, args.rows, width, 2, device)  # warm-up
            step[kind] = statistics.median(decode_steps(model, cache, args.rows, width + 2, args.steps, device))
            own[kind] = statistics.median(update_only(cache, model, args.rows, args.steps, device, dtype))
            del cache
        first = first or dict(step)
        last = dict(step)
        print(
            f"{width:>6} | {step['old'] * 1e3:>11.2f} {step['new'] * 1e3:>11.2f} {step['old'] / step['new']:>6.2f}x | "
            f"{own['old'] * 1e3:>12.3f} {own['new'] * 1e3:>12.3f} {own['old'] / own['new']:>6.1f}x"
        )
    print(
        f"step time growth {widths[0]} -> {widths[-1]} columns: old {last['old'] / first['old']:.2f}x, "
        f"new {last['new'] / first['new']:.2f}x"
    )


if __name__ == "__main__":
    main()
