"""One job on several devices: ``training.num_processes = N`` trains with N processes and PyTorch distributed.

The RQ work-horse that runs the job is rank 0: it loads and tokenizes the data, keeps the heartbeat, reports
progress, evaluates, checkpoints and publishes, exactly as a one-process job does. ``launch`` starts ranks
1..N-1 with ``torch.multiprocessing`` (spawn: a fresh interpreter each, never a fork of the threaded
work-horse, and CUDA-safe); each loads the base model itself, wraps it with the same Bone config and runs the
same ``worker.train.train`` loop with a ``Group``.

How the ranks stay equal to one process (no DDP wrapper: only the ``bone_*`` parameters train, so summing
their gradients is all DDP would do here):
* every rank draws the same global batches from the same seeded stream (global batch = batch_size x
  gradient_accumulation_steps examples, as with one process) and runs only rows ``rank::N`` of each
  micro-batch; the loss divisor counts the trainable tokens of the *global* step;
* after backward, one all-reduce sums the trainable gradients (and the step's loss and token count), so every
  rank clips and steps with the single-process gradient, up to float summation order;
* rank 0's weights are broadcast once at the start (and after resuming from a checkpoint, which every rank
  reads); rank 0 polls the cancel flag at each step and the verdict is all-reduced, so all ranks stop together.

Backend: NCCL on CUDA (rank r on ``cuda:r``), gloo on CPU. Rendezvous is a TCP store on 127.0.0.1 (one
machine); rank 0 waits for the others to report ready while watching their processes, so a rank that dies while
starting fails the job at once. Later, a dead peer breaks gloo's collectives at once (NCCL's after
``BONE_DISTRIBUTED_TIMEOUT_S``). Helpers exit by themselves when the work-horse goes away.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

READY_KEY = "bone-ready"


class Group:
    """One rank's view of the job's process group (the default torch.distributed group)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Sequence[Any]) -> list[Any]:
        """This rank's rows of a global micro-batch (disjoint across ranks, together all of it)."""
        return list(batch[self.rank::self.world_size])

    def broadcast(self, params: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def from_main(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item() > 0)

    def all_reduce_grads(self, params: list[torch.Tensor], loss: float, tokens: int) -> tuple[float, int]:
        """Sum every rank's trainable gradients in place (one flat buffer); return the summed loss and tokens."""
        grads = []
        for p in params:
            if p.grad is None:  # a rank with an empty shard this step still takes part
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads)
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
        stats = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        return float(stats[0]), int(round(float(stats[1])))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def check_processes(n: int, device: torch.device, max_processes: int) -> None:
    if n > max_processes:
        raise ValueError(f"training.num_processes={n} exceeds this worker's limit of {max_processes} "
                         "(BONE_MAX_NUM_PROCESSES)")
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(f"training.num_processes={n} needs {n} GPUs; this worker has {torch.cuda.device_count()}; "
                         "send the job to a queue whose workers have enough GPUs")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def launch(n: int, *, device: torch.device, timeout_s: float, helper_args: dict[str, Any],
           start_timeout_s: float = 600.0) -> Iterator[Group]:
    """Start ranks 1..n-1, join the process group as rank 0 and yield rank 0's ``Group``; on leaving, wait
    for the helpers (or, after an error or cancel, kill them) and tear the group down."""
    import torch.multiprocessing as mp

    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, n, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    ctx = mp.get_context("spawn")
    helpers = []
    for rank in range(1, n):
        proc = ctx.Process(target=_helper_main, args=(rank, n, port, device.type, timeout_s, helper_args),
                           name=f"bone-rank-{rank}", daemon=True)
        proc.start()
        helpers.append(proc)
    ok = False
    try:
        deadline = time.monotonic() + start_timeout_s
        while store.add(READY_KEY, 0) < n - 1:  # wait for every helper, but notice one that dies meanwhile
            for rank, proc in enumerate(helpers, start=1):
                if proc.exitcode is not None:
                    raise RuntimeError(f"training process rank {rank} of {n} exited with code {proc.exitcode} "
                                       "while starting (see the worker log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {n - 1} other training processes were not ready after {start_timeout_s:g} s")
            time.sleep(0.1)
        if device.type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend_for(device), store=store, rank=0, world_size=n,
                                timeout=timedelta(seconds=timeout_s))
        log.info("distributed training: %d processes, backend %s", n, backend_for(device))
        yield Group(0, n, rank_device(device, 0))
        ok = True
    finally:
        if ok:
            for proc in helpers:
                proc.join(timeout=60)
        for proc in helpers:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group after a failure: nothing left to release
                pass
        failed = [(r, p.exitcode) for r, p in enumerate(helpers, start=1) if p.exitcode not in (0, None)]
        if ok and failed:
            raise RuntimeError(f"training processes failed: {', '.join(f'rank {r} (exit {c})' for r, c in failed)}")


# --- ranks 1..N-1 ---------------------------------------------------------------------------------------------
def _exit_with_parent(parent: int) -> None:
    """The work-horse (rank 0) may be killed abruptly (cancel by RQ, OOM): a helper must not outlive it."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(1.0)


def _helper_main(rank: int, world_size: int, port: int, device_type: str, timeout_s: float,
                 args: dict[str, Any]) -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        _helper_train(rank, world_size, port, device_type, timeout_s, args)
    except Exception:  # noqa: BLE001 - the exit code tells rank 0; the traceback goes to the worker log
        traceback.print_exc()
        os._exit(1)


def _helper_train(rank: int, world_size: int, port: int, device_type: str, timeout_s: float,
                  args: dict[str, Any]) -> None:
    from bone import get_bone_model
    from core.base_model import load_base_model
    from worker.data import Cancelled
    from worker.train import train

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    device = rank_device(torch.device(device_type), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    loaded = load_base_model(args["base_model"], args["settings"], device=device)
    bone_model = get_bone_model(loaded.model, args["bone_config"], adapter_name=args["adapter_name"])
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
    store.add(READY_KEY, 1)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        # eval rows too: rank 0 alone evaluates, but every rank must reach the same collectives around it
        train(bone_model, loaded.tokenizer, args["examples"], args["spec"], device=device,
              eval_examples=args["eval_examples"],
              checkpoint_dir=Path(args["checkpoint_dir"]) if args.get("checkpoint_dir") else None,
              adapter_name=args["adapter_name"], group=Group(rank, world_size, device))
    except Cancelled:
        pass  # rank 0 records the cancel
    finally:
        dist.destroy_process_group()
