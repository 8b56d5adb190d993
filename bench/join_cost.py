"""What a join, a leave and a prompt entering chunk by chunk cost the running batch's per-row plans.

    python bench/join_cost.py                       # small model, 16 rows on 16 adapters, r=16, 7 projections
    python bench/join_cost.py --rows 64 --r 64 --repeats 7
    python bench/join_cost.py --rows 64 --r 64 --device cuda --dtype bfloat16

Rows each on their own adapter go through one bmm over their blocks stacked (bone.routing, RowPlan.singles).
Before bone.block_stacks a serving loop built those stacks afresh for every batch composition (a copy of every
running adapter's blocks on every join and leave), and the engine's one open routing was replaced by an
entering prompt's at every chunk, so every decode step between two chunks rebuilt every plan. Both variants run
here in one process on the same model, interleaved:

- "rebuilt": a fresh ``BoneModel.routing`` per composition and per switch between the decode rows and the
  entering row (what the engine did);
- "kept": the routings of ``app.engine.model_host.ModelHost`` (the batch's and the entering row's open side by
  side, stacks shared across compositions; what the engine does now).

Printed: the time of the first decode step after a join and after a leave, after the pool loaded an adapter no
row uses (both ways run today's plan check, which keeps the plans), and of a decode step that follows a
prefill chunk, each against a steady decode step of the same rows (median [min-max] over --repeats), the blocks
copied per event, and, by arithmetic, the bytes a join copies for Llama-2-7B (all seven projections, bf16).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.model_host import ModelHost  # noqa: E402
from bench.models import LLAMA_PROJECTIONS, build_model  # noqa: E402
from bone import BoneConfig  # noqa: E402
from bone.save import adapter_state_dict  # noqa: E402


def build_host(args) -> tuple[ModelHost, list[str]]:
    host = ModelHost(build_model(args.model).eval().to(device=args.device, dtype=args.dtype))
    names = [f"a{i}" for i in range(args.rows + 1)]
    g = torch.Generator().manual_seed(0)
    config = BoneConfig(r=args.r, target_modules=LLAMA_PROJECTIONS, init_weights=False)
    for name in names:
        host.bone_model.add_adapter(name, config)
        for _, layer in host.bone_model.bone_layers():
            blk = layer.bone_block[name]
            blk.data.copy_(torch.randn(blk.shape, generator=g) * 0.02)  # (onto the block's device and dtype)
    return host, names


class Rebuilt:
    """The engine's routing before: one open routing, replaced on any change of rows, stacks built afresh."""

    def __init__(self, host: ModelHost) -> None:
        self.bm, self.slots, self.ctx, self.routed = host.bone_model, None, None, None

    def forward(self, slots, side=False, **kwargs):
        if self.slots != slots:
            self.end_batch()
            self.ctx = self.bm.routing(slots)
            self.routed, self.slots = self.ctx.__enter__(), list(slots)
        return self.routed(**kwargs)

    def end_batch(self):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = self.routed = self.slots = None


def timed(fn, device: torch.device) -> float:
    """Wall time of ``fn``; on CUDA it waits for the queued kernels before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def one_round(way, host: ModelHost, names: list[str], args, copied, loaded) -> dict[str, tuple[float, int]]:
    """Times and blocks copied of: a steady step, the step after a leave, a join, a load, a chunk."""
    loaded_config, loaded_tensors = loaded
    vocab = host.bone_model.base_model.config.vocab_size
    rows = names[: args.rows]
    dev = args.device
    step = lambda slots: way.forward(slots, input_ids=torch.randint(0, vocab, (len(slots), 1), device=dev))  # noqa: E731
    chunk = torch.randint(0, vocab, (1, args.chunk), device=dev)
    out = {}
    step(rows)
    step(rows)
    c = copied()
    out["steady step"] = (timed(lambda: step(rows), dev), copied() - c)
    left = rows[:1] + rows[-1:] + rows[2:-1]  # row 1 leaves: the last row moves into its slot
    c = copied()
    out["step after a leave"] = (timed(lambda: step(left), dev), copied() - c)
    step(left)
    joined = left + [names[args.rows]]  # a newcomer joins at the end
    c = copied()
    out["step after a join"] = (timed(lambda: step(joined), dev), copied() - c)
    step(joined)
    # the pool loads an adapter no row uses (an idle tenant's) between two steps, as the engine does
    host.add_adapter("loaded", loaded_config, loaded_tensors)
    c = copied()
    out["step after a load"] = (timed(lambda: step(joined), dev), copied() - c)
    host.delete_adapter("loaded")
    step(joined)
    way.forward([names[0]], side=True, input_ids=chunk)  # a prompt's chunk enters between two decode steps
    c = copied()
    out["step after a chunk"] = (timed(lambda: step(joined), dev), copied() - c)
    way.end_batch()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "small"], default="small")
    ap.add_argument("--rows", type=int, default=16, help="running rows, each on its own adapter")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=64, help="tokens of the entering prompt's chunk")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device, args.dtype = torch.device(args.device), getattr(torch, args.dtype)
    host, names = build_host(args)
    loaded_config = BoneConfig(r=args.r, target_modules=LLAMA_PROJECTIONS)
    loaded = (loaded_config, adapter_state_dict(host.bone_model.base_model, names[0], loaded_config))
    ways = {"rebuilt": Rebuilt(host), "kept": host}
    counters = {"rebuilt": lambda: 0, "kept": lambda: host.stacked_blocks_copied}
    results: dict[str, dict[str, list]] = {w: {} for w in ways}
    with torch.no_grad():
        for k in range(args.repeats + 1):
            for w in list(ways)[k % 2 :] + list(ways)[: k % 2]:  # alternate which goes first
                got = one_round(ways[w], host, names, args, counters[w], loaded)
                if k:  # the first round warms up
                    for event, value in got.items():
                        results[w].setdefault(event, []).append(value)
    layers = len(host.bone_model.bone_layers())
    print(
        f"join cost: model={args.model} rows={args.rows} (each its own adapter) r={args.r} chunk={args.chunk} "
        f"threads={torch.get_num_threads()} repeats={args.repeats} device={args.device} dtype={args.dtype}; "
        f"{layers} adapted layers"
    )
    print(f"{'event':<22}{'way':<9}{'ms median [min-max]':>24}{'x steady':>10}{'blocks copied':>15}")
    for event in results["kept"]:
        for w in ways:
            ms = [t * 1e3 for t, _ in results[w][event]]
            steady = statistics.median(t * 1e3 for t, _ in results[w]["steady step"])
            copies = results[w][event][-1][1]
            shown = "-" if w == "rebuilt" else str(copies)  # the old stacks kept no count
            print(
                f"{event:<22}{w:<9}{statistics.median(ms):>10.2f} [{min(ms):.2f}-{max(ms):.2f}]"
                f"{statistics.median(ms) / steady:>10.2f}{shown:>15}"
            )
    # Llama-2-7B, all seven projections: per layer r x out for q, k, v, o, down (4096) and gate, up (11008)
    per_adapter = 32 * 64 * (5 * 4096 + 2 * 11008) * 2
    print(
        f"\nLlama-2-7B, all seven projections, r=64, bf16, 64 rows each on its own adapter: a join copied "
        f"{64 * per_adapter / 1e9:.1f} GB of stacked blocks before (every row's), {per_adapter / 1e6:.0f} MB now "
        "(the newcomer's); a decode step after a prefill chunk copied the same 11 GB before, nothing now"
    )


if __name__ == "__main__":
    main()
