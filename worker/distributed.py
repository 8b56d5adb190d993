"""One job on several devices: ``training.num_processes = N`` trains with N processes on PyTorch's own engine.

* **Launch**: ``torch.distributed.elastic`` (the launcher behind ``torchrun``) starts the N ranks from the RQ
  work-horse (``elastic_launch``: c10d rendezvous on a free loopback port, run id = job id, spawned processes,
  ``BONE_DISTRIBUTED_MAX_RESTARTS`` restarts of the whole group after a rank fails; a restarted group resumes
  from the job's newest checkpoint in the registry's store, which every rank fetches for itself).
* **Sync**: each rank wraps the Bone model in ``DistributedDataParallel`` (bucketed all-reduce of the trainable
  ``bone_*`` gradients, overlapped with backward; ``no_sync()`` on all but the last micro-batch of a step), or
  with ``training.sharding = "full"`` shards it with FSDP2 (worker/sharding.py: each rank holds 1/N of the base
  and of the blocks; gradients reduce-scattered). Sharded, every rank evaluates and gathers the blocks for
  checkpoints and the adapter (collectives); rank 0 still alone reports and writes.

How the ranks stay equal to one process:
* every rank draws the same global batches from the same seeded stream (global batch = batch_size x
  gradient_accumulation_steps examples, as with one process) and runs only its rows of each micro-batch
  (``Ranks.shard``); the loss divisor counts the trainable tokens of the *global* step. DDP averages
  gradients over the ranks, so each rank's loss is multiplied by the world size: the average of the scaled
  shard gradients is the single-process gradient (up to float summation order);
* DDP broadcasts rank 0's trainable weights when it wraps the model (after a resume, which every rank reads);
* rank 0 alone reports progress, evaluates, checkpoints and saves the final adapter for the work-horse to
  publish; it polls the cancel flag at each step and the verdict is all-reduced, so all ranks stop together.

The work-horse is the elastic agent: it waits for the ranks, returns rank 0's ``TrainResult`` (or raises
``Cancelled`` / one line naming the failed rank). Backend: NCCL on CUDA (local rank r on ``cuda:r``), gloo on
CPU. Ranks exit by themselves when the work-horse goes away (cancel by RQ, OOM killer).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from worker.ranks import Ranks

log = logging.getLogger(__name__)

CANCELLED = "cancelled"  # what a rank returns when the job was cancelled (a raise would count as a failure)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device.type == "cuda" else torch.device("cpu")


def check_processes(n: int, device: torch.device, max_processes: int) -> None:
    if n > max_processes:
        raise ValueError(
            f"training.num_processes={n} exceeds this worker's limit of {max_processes} (BONE_MAX_NUM_PROCESSES)"
        )
    if device.index is not None and n > 1:
        raise ValueError(
            f"training.num_processes={n} needs a worker that owns its machine's GPUs; this worker is "
            f"pinned to {device} (--device); send the job to a queue served by an unpinned worker"
        )
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(
            f"training.num_processes={n} needs {n} GPUs; this worker has {torch.cuda.device_count()}; "
            "send the job to a queue whose workers have enough GPUs"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """The elastic agent installs its own SIGTERM/SIGINT/... handlers in the calling process; put ours
    (RQ's in a work-horse, pytest's in tests) back afterwards."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {name: signal.getsignal(getattr(signal, name)) for name in names} if main_thread else {}
    try:
        yield
    finally:
        for name, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)


def run(
    n: int,
    *,
    device: torch.device,
    settings,
    job,
    bone_config,
    examples,
    eval_examples,
    checkpoint_dir: Path,
    adapter_dir: Path,
    adapter_name: str,
    node=None,
):
    """Train the job on ``n`` processes started by torch elastic (on each of ``node.count`` machines when ``node``,
    a ``worker.nodes.Node``, is given); returns rank 0's ``TrainResult`` after rank 0 saved the adapter into
    ``adapter_dir``, or None when rank 0 ran on another node. Raises ``Cancelled`` when the job was cancelled,
    ``GangNotAssembled`` when the nodes did not all meet. ``examples`` on disk (``worker.tokenized.ArrowExamples``)
    reach the ranks as their path: each memory-maps the same file."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError

    from worker.data import Cancelled
    from worker.nodes import GangNotAssembled

    check_processes(n, device, settings.max_num_processes)
    config = launch_config(n, job.id, settings, node)
    threads = int(os.environ.get("OMP_NUM_THREADS") or 1)  # N ranks share this machine's cores
    # Each (re)started group's rank 0 hosts a fresh store for init_process_group. The default (the agent's
    # rendezvous store, shared by every restart round) keeps the dead group's keys: a restarted rank could
    # read the old rank 0's gloo address and fail with "connection refused" (seen in ~1 of 2 restarts here).
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    args = {
        "device_type": device.type,
        "timeout_s": settings.distributed_timeout_s,
        "threads": threads,
        "parent": os.getpid(),
        "settings": settings,
        "job": job,
        "bone_config": bone_config,
        "examples": examples,
        "eval_examples": eval_examples,
        "checkpoint_dir": str(checkpoint_dir),
        "adapter_dir": str(adapter_dir),
        "adapter_name": adapter_name,
    }
    log.info(
        "distributed training: %d processes, backend %s, up to %d restarts",
        n,
        backend_for(device),
        settings.distributed_max_restarts,
    )
    try:
        with _own_signal_handlers():
            outcomes = launch(config, args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise RuntimeError(
            f"training process rank {rank} of {config.nproc_per_node * config.max_nodes} failed: "
            f"{_one_line(failure.message)}"
        ) from None
    except RendezvousError as exc:  # only a multi-node gang waits for others
        detail = "" if isinstance(exc, RendezvousTimeoutError) else f" ({type(exc).__name__}: {_one_line(str(exc))})"
        raise GangNotAssembled(
            f"the job's {config.max_nodes} nodes did not all join its rendezvous within "
            f"{settings.rendezvous_timeout_s:g} s (BONE_RENDEZVOUS_TIMEOUT_S){detail}"
        ) from None
    if CANCELLED in outcomes.values():  # every rank returns it; this node's ranks may not include rank 0
        raise Cancelled()
    return outcomes.get(0)


def launch(config, args: dict[str, Any]) -> dict[int, Any]:
    """This node's ranks' return values by global rank."""
    from torch.distributed.launcher.api import elastic_launch

    return elastic_launch(config, _rank_main)(args)


def launch_config(n: int, run_id: str, settings, node=None):
    """One machine: a c10d rendezvous on a free loopback port. Several (``node``): every node's agent meets at the
    endpoint node 0 published, which node 0's agent hosts; all ``node.count`` must join (worker/nodes.py)."""
    from torch.distributed.launcher.api import LaunchConfig

    common = {
        "nproc_per_node": n,
        "run_id": run_id,
        "rdzv_backend": "c10d",
        "monitor_interval": 0.1,
        "max_restarts": settings.distributed_max_restarts,
        "start_method": "spawn",
    }
    if node is None:
        return LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            rdzv_endpoint=f"127.0.0.1:{_free_port()}",
            rdzv_configs={"join_timeout": int(settings.distributed_timeout_s)},
            **common,
        )
    return LaunchConfig(
        min_nodes=node.count,
        max_nodes=node.count,
        rdzv_endpoint=node.endpoint,
        rdzv_configs={"join_timeout": int(settings.rendezvous_timeout_s), "is_host": node.is_host},
        local_addr=node.address,
        **common,
    )


def _one_line(message: Any) -> str:
    if isinstance(message, dict):
        message = message.get("message", message)
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message (see the worker log)"


# --- every rank -----------------------------------------------------------------------------------------------
def _exit_with_parent(parent: int) -> None:
    """The work-horse (the elastic agent) may be killed abruptly (cancel by RQ, OOM): a rank must not outlive it."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(1.0)


def _rank_main(args: dict[str, Any]):
    """A rank's entry point (elastic sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous store)."""
    threading.Thread(target=_exit_with_parent, args=(args["parent"],), daemon=True).start()
    torch.set_num_threads(args["threads"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = rank_device(torch.device(args["device_type"]), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=timedelta(seconds=args["timeout_s"]))
    try:
        return _rank_train(Ranks(rank, world_size, device, sharding=args["job"].training.sharding), args)
    finally:
        dist.destroy_process_group()


def _rank_train(ranks: Ranks, args: dict[str, Any]):
    from bone import get_bone_model
    from core.base_model import load_base_model
    from core.jobstore import JobStore
    from core.logs import job_id_var
    from core.storage.resume_state import ResumeStore
    from worker.data import Cancelled
    from worker.train import train

    settings, job = args["settings"], args["job"]
    loaded = load_base_model(job.base_model, settings, device=ranks.device)
    bone_model = get_bone_model(loaded.model, args["bone_config"], adapter_name=args["adapter_name"])
    hooks: dict[str, Any] = {}
    if ranks.is_main:  # rank 0 reports: its own Redis connection, the same reporter the one-process path uses
        import redis

        from worker.progress import ProgressReporter
        from worker.publish import CheckpointPublisher

        job_id_var.set(job.id)
        store = JobStore(redis.Redis.from_url(settings.redis_url))
        reporter = ProgressReporter(store, job.id)
        hooks = {
            "on_step": reporter.on_step,
            "should_stop": reporter.should_stop,
            "on_event": CheckpointPublisher(store, settings, job, args["bone_config"]).wrap(reporter.on_event),
        }
    try:
        # eval rows too: rank 0 alone evaluates, but every rank must reach the same collectives around it
        result = train(
            bone_model,
            loaded.tokenizer,
            args["examples"],
            job.training,
            device=ranks.device,
            eval_examples=args["eval_examples"],
            checkpoint_dir=Path(args["checkpoint_dir"]),
            checkpoints_kept=settings.checkpoints_kept,
            adapter_name=args["adapter_name"],
            shared_checkpoints=ResumeStore.from_settings(settings).for_job(job.id),
            ranks=ranks,
            **hooks,
        )
    except Cancelled:
        return CANCELLED
    if ranks.sharded:  # every rank gathers the blocks (a collective); rank 0 writes them
        from worker.sharding import trainable_state, whole_trainable

        whole = trainable_state(bone_model)
        if ranks.is_main:
            with whole_trainable(bone_model, whole):
                bone_model.save_pretrained(args["adapter_dir"], adapter_name=args["adapter_name"])
            return result
        return None
    if ranks.is_main:
        bone_model.save_pretrained(args["adapter_dir"], adapter_name=args["adapter_name"])
        return result
    return None
