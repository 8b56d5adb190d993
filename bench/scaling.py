"""Distributed Bone training on real shapes: DDP scaling 1 → N devices (tokens/s and efficiency against one device,
same run) and FSDP2's peak memory per device next to DDP's, with the bf16 step time of each.

    python bench/scaling.py --model 0.5b            # Qwen2-0.5B-shaped, on every GPU of the machine
    python bench/scaling.py --model 7b --batch 1    # Llama-2-7B-shaped
    python bench/scaling.py --model tiny --device cpu --world 2   # the same steps on CPU (gloo), a dry run

Models are built from their configs with random weights directly on the device in bf16 (fp32 on CPU); Bone
r=16 on the seven projections; the loss is the worker's own (``worker.loss.CausalLMLoss``), synced by the
worker's DDP wrapper (``Ranks.wrap``) or sharded by its FSDP2 path (``worker.sharding.shard``), launched by
torch elastic as jobs are. Each rank runs ``--batch`` × ``--seq`` random tokens per step; figures are medians
over ``--steps`` timed steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": (
        "llama",
        dict(
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        ),
    ),
    "0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),
    "7b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
    ),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rank(args: dict) -> dict:
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from bone import BoneConfig, get_bone_model
    from worker.loss import CausalLMLoss
    from worker.ranks import Ranks

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args["device"] == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        kind, shape = SHAPES[args["model"]]
        dtype = torch.bfloat16 if cuda else torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape), dtype=dtype)
        bone = get_bone_model(model, BoneConfig(r=16, target_modules=PROJECTIONS))
        loss_fn = CausalLMLoss(bone)
        if args["mode"] == "fsdp" and world > 1:
            from worker.sharding import shard

            loss_fn = shard(loss_fn, bone, device, world)
        elif world > 1:
            loss_fn = Ranks(rank, world, device).wrap(loss_fn)
        trainable = [p for p in loss_fn.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, shape["vocab_size"], (args["batch"], args["seq"]), generator=g).to(device)
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(args["warmup"] + args["steps"]):
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            loss = loss_fn(ids, None, ids) / ids.numel()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            if step >= args["warmup"]:
                times.append(time.perf_counter() - started)
        step_s = statistics.median(times)
        return {
            "step_s": step_s,
            "tokens_s": ids.numel() / step_s,
            "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else 0,
        }
    finally:
        dist.destroy_process_group()


def launch(world: int, mode: str, args) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        run_id=f"bench-{mode}-{world}",
        max_restarts=0,
        start_method="spawn",
    )
    results = elastic_launch(config, _rank)(
        {
            "model": args.model,
            "device": args.device,
            "mode": mode,
            "batch": args.batch,
            "seq": args.seq,
            "warmup": args.warmup,
            "steps": args.steps,
        }
    )
    per_rank = list(results.values())
    return {
        "tokens_s": sum(r["tokens_s"] for r in per_rank),
        "step_s": max(r["step_s"] for r in per_rank),
        "peak_gib": max(r["peak_bytes"] for r in per_rank) / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(SHAPES), default="0.5b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world", type=int, default=0, help="most processes (default: every GPU; 2 on CPU)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per device per step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    top = args.world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    worlds = sorted({1, *[w for w in (2, 4, 8) if w <= top], top})
    print(f"model={args.model} device={args.device} batch/device={args.batch} seq={args.seq} worlds={worlds}")
    one = None
    for world in worlds:
        ddp = launch(world, "ddp", args)
        one = one or ddp
        efficiency = ddp["tokens_s"] / (world * one["tokens_s"])
        line = (
            f"DDP  x{world}: {ddp['tokens_s']:10.0f} tokens/s  step {ddp['step_s'] * 1e3:8.1f} ms  "
            f"scaling efficiency {efficiency:.2f}  peak {ddp['peak_gib']:.2f} GiB/device"
        )
        print(line, flush=True)
        if world > 1:
            fsdp = launch(world, "fsdp", args)
            print(
                f"FSDP x{world}: {fsdp['tokens_s']:10.0f} tokens/s  step {fsdp['step_s'] * 1e3:8.1f} ms  "
                f"peak {fsdp['peak_gib']:.2f} GiB/device ({fsdp['peak_gib'] / max(ddp['peak_gib'], 1e-9):.2f}x DDP)",
                flush=True,
            )


if __name__ == "__main__":
    main()
