"""Co-training (worker/cotrain.py) against the same jobs run one after another (worker.train.train each).

    python bench/cotrain.py                                   # 8 jobs x 60 steps, batch 2 x 128, Bone r=8, small
    python bench/cotrain.py --device cuda --model small --jobs 8 --steps 60
    python bench/cotrain.py --jobs 4 --steps 20 --threads 2  # quicker
    python bench/cotrain.py --device cuda --model 0.5b       # Qwen2-0.5B-shaped (bench/scaling.py's shape)

Each job has its own data (random tokens, every token a target) and seed. Sequential: job k starts when job
k-1 ends, each on its own copy of the base (as a worker gives each job one). Group: all of them in one
``cotrain`` call on one copy. Bounded: the groups a worker forms under BONE_COTRAIN_MAX_SLOWDOWN
(``--max-slowdown``, default the setting's): the step cost timed on this device as the worker times it
(worker/cotrain_cost.py), jobs admitted greedily in queue order, the groups run one after another. Printed: wall
time of each mode, tokens/s per job and in total, the ratio group / sequential (issue 19's target: <= 0.5), the
first job's completion time in the group against the same job alone (target: <= 1.2), and the slowdown the cost
model predicts for the whole group next to the one measured. Model copies are made before the clock starts.

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
from core.settings import Settings  # noqa: E402
from worker.cotrain import Member, cotrain  # noqa: E402
from worker.cotrain_cost import StepCost, admits  # noqa: E402
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
    parser.add_argument(
        "--max-slowdown",
        type=float,
        default=Settings.model_fields["cotrain_max_slowdown"].default,
        help="the worker's bound for the 'bounded' run (BONE_COTRAIN_MAX_SLOWDOWN; 0: none)",
    )
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

    # -- as the worker forms groups under BONE_COTRAIN_MAX_SLOWDOWN: timed on this device, then admitted greedily
    cost = StepCost.measure(copy.deepcopy(base), args.batch, args.seq, device)
    assert cost is not None, "twice the batch does not fit the device"
    partition: list[list[int]] = []
    for k in range(args.jobs):
        if partition and admits(cost, [args.batch] * len(partition[-1]), args.batch, args.max_slowdown):
            partition[-1].append(k)
        else:
            partition.append([k])
    done_bounded: dict[str, float] = {}
    bounded_models = [
        get_bone_model(copy.deepcopy(base), config, adapter_name=TRAINING_SLOT)
        if len(group) == 1
        else BoneModel(copy.deepcopy(base))
        for group in partition
    ]
    sync()
    start = time.perf_counter()
    for group, model in zip(partition, bounded_models):
        if len(group) == 1:  # a job nobody joined trains alone, as the worker runs it
            train(model, Tokenizer(), data[group[0]], specs[group[0]], device=device)
            sync()
            done_bounded[f"job-{group[0]}"] = time.perf_counter() - start
            continue
        cotrain(
            model,
            Tokenizer(),
            [
                Member(
                    key=f"job-{k}",
                    config=config,
                    examples=data[k],
                    spec=specs[k],
                    on_done=lambda m, result, error: (
                        sync(),
                        done_bounded.__setitem__(m.key, time.perf_counter() - start),
                    ),
                )
                for k in group
            ],
            device=device,
        )
    bounded = max(done_bounded.values())

    load = os.getloadavg()[0]
    print(
        f"{args.jobs} jobs x {args.steps} steps, batch {args.batch} x {args.seq}, Bone r={args.r}, "
        f"model {args.model} on {device} ({dtype}), torch threads {torch.get_num_threads()}, load {load:.1f}"
    )
    print(f"{'mode':<12}{'wall s':>10}{'tok/s total':>14}{'tok/s per job':>16}{'first job done s':>18}")
    runs = (
        ("sequential", sequential, alone_first, 1),
        ("group", grouped, done_group["job-0"], args.jobs),
        ("bounded", bounded, done_bounded["job-0"], len(partition[0])),
    )
    for name, wall, first, size in runs:
        total = tokens_per_job * args.jobs / wall
        per_job = tokens_per_job / (wall * size / args.jobs)  # a job's tokens over the time its group trained
        print(f"{name:<12}{wall:>10.2f}{total:>14.0f}{per_job:>16.0f}{first:>18.2f}")
    print(f"group / sequential wall time: {grouped / sequential:.2f} (target <= 0.5)")
    print(f"first job's completion in the group / alone: {done_group['job-0'] / alone_first:.2f} (target <= 1.2)")
    print(
        f"step cost on this device: {cost.measured_s[0] * 1e3:.1f} ms at {args.batch} rows, "
        f"{cost.measured_s[1] * 1e3:.1f} ms at {2 * args.batch}; predicted slowdown of a group of {args.jobs}: "
        f"{cost.slowdown(args.jobs * args.batch, args.batch):.2f} (measured above: "
        f"{done_group['job-0'] / alone_first:.2f})"
    )
    print(
        f"bounded (BONE_COTRAIN_MAX_SLOWDOWN={args.max_slowdown:g}): groups of {[len(g) for g in partition]}; "
        f"wall / sequential {bounded / sequential:.2f}, first job / alone {done_bounded['job-0'] / alone_first:.2f}"
    )


if __name__ == "__main__":
    main()
