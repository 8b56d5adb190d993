"""Co-training (worker/cotrain.py) against the same jobs run one after another (worker.train.train each).

    python bench/cotrain.py                                   # 8 jobs x 60 steps, batch 2 x 128, Bone r=8, small
    python bench/cotrain.py --device cuda --model small --jobs 8 --steps 60
    python bench/cotrain.py --jobs 4 --steps 20 --threads 2  # quicker
    python bench/cotrain.py --device cuda --model 0.5b       # Qwen2-0.5B-shaped (bench/scaling.py's shape)

Each job has its own data (random tokens, every token a target) and seed. Sequential: job k starts when job
k-1 ends, each on its own copy of the base (as a worker gives each job one). Group: all of them in one
``cotrain`` call on one copy. Printed: wall time of each mode, tokens/s per job and in total, the ratio
group / sequential (issue 19's target: <= 0.5) and the first job's completion time in the group against the
same job alone (target: <= 1.2). Model copies are made before the clock starts in both modes.

On a CPU the forward/backward costs about the same per row however rows are grouped, so the group mostly
saves per-step overhead; the gain the issue targets comes from a GPU that one small job leaves idle.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.models import build_model  # noqa: E402
from bone import BoneConfig, BoneModel, get_bone_model  # noqa: E402
from core.jobs import TrainingSpec  # noqa: E402
from core.names import TRAINING_SLOT  # noqa: E402
from worker.cotrain import Member, cotrain  # noqa: E402
from worker.data import Example  # noqa: E402
from worker.train import train  # noqa: E402


class Tokenizer:
    pad_token_id = 0
    eos_token_id = 0


def job_data(k: int, n: int, seq: int, vocab: int) -> list[Example]:
    g = torch.Generator().manual_seed(1000 + k)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (seq,), generator=g).tolist()
        rows.append(Example(ids, ids))
    return rows


def base_model(name: str, dtype: torch.dtype):
    """A bench model (bench/models.py) or a shape of bench/scaling.py (e.g. ``0.5b``), randomly initialised."""
    from bench.models import BENCH_MODELS

    if name in BENCH_MODELS:
        return build_model(name, dtype=dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.scaling import SHAPES

    kind, shape = SHAPES[name]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape)).to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    base = base_model(args.model, dtype).to(device)
    vocab = base.config.vocab_size
    config = BoneConfig(r=args.r)
    specs = [
        TrainingSpec(max_steps=args.steps, batch_size=args.batch, learning_rate=1e-3, seed=k, max_seq_length=args.seq)
        for k in range(args.jobs)
    ]
    data = [job_data(k, max(4, args.batch * 8), args.seq, vocab) for k in range(args.jobs)]
    tokens_per_job = args.steps * args.batch * args.seq

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up: kernels, allocator, autotuning (not timed)
    warm = get_bone_model(copy.deepcopy(base), config, adapter_name=TRAINING_SLOT)
    train(warm, Tokenizer(), data[0], TrainingSpec(max_steps=3, batch_size=args.batch, seed=0), device=device)
    del warm

    # -- one after another
    models = [get_bone_model(copy.deepcopy(base), config, adapter_name=TRAINING_SLOT) for _ in range(args.jobs)]
    sync()
    start = time.perf_counter()
    done_alone = []
    for k in range(args.jobs):
        train(models[k], Tokenizer(), data[k], specs[k], device=device)
        sync()
        done_alone.append(time.perf_counter() - start)
    sequential = done_alone[-1]
    alone_first = done_alone[0]
    del models

    # -- in one group
    group_model = BoneModel(copy.deepcopy(base))
    done_group: dict[str, float] = {}
    members = [
        Member(
            key=f"job-{k}",
            config=config,
            examples=data[k],
            spec=specs[k],
            on_done=lambda m, result, error: (sync(), done_group.__setitem__(m.key, time.perf_counter() - start)),
        )
        for k in range(args.jobs)
    ]
    sync()
    start = time.perf_counter()
    cotrain(group_model, Tokenizer(), members, device=device)
    grouped = max(done_group.values())

    load = os.getloadavg()[0]
    print(
        f"{args.jobs} jobs x {args.steps} steps, batch {args.batch} x {args.seq}, Bone r={args.r}, "
        f"model {args.model} on {device} ({dtype}), torch threads {torch.get_num_threads()}, load {load:.1f}"
    )
    print(f"{'mode':<12}{'wall s':>10}{'tok/s total':>14}{'tok/s per job':>16}{'first job done s':>18}")
    for name, wall, first in (("sequential", sequential, alone_first), ("group", grouped, done_group["job-0"])):
        total = tokens_per_job * args.jobs / wall
        per_job = tokens_per_job / (wall if name == "group" else wall / args.jobs)
        print(f"{name:<12}{wall:>10.2f}{total:>14.0f}{per_job:>16.0f}{first:>18.2f}")
    print(f"group / sequential wall time: {grouped / sequential:.2f} (target <= 0.5)")
    print(f"first job's completion in the group / alone: {done_group['job-0'] / alone_first:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
