"""Worker fleets: queues by resource, and what each live worker advertises.

* **Queues.** ``settings.queue_name`` (default ``bone-training``) plus the resource queues of
  ``BONE_QUEUES`` (e.g. ``cpu,gpu-24g,gpu-80g``) are the queues the API accepts. A job goes to the queue it
  names (``queue``), else to the queue its base model maps to in ``BONE_RESOURCE_QUEUES``
  (``{"meta-llama/Llama-3.1-70B": "gpu-80g"}``), else to the default queue. Queue names are RQ queue names.
* **Workers.** ``bone-server worker --queues cpu,gpu-24g`` serves those queues (default: the default queue)
  and keeps a hash ``bone:worker:<rq worker name>`` alive (TTL ~ the RQ worker TTL) with its host, pid,
  device, device count, memory and queues; the job it is running comes from RQ's own worker hash.
  ``GET /workers`` and ``GET /queues`` read them (the API never imports ``worker``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from core.errors import InvalidRequest
from core.records import PREFIX
from core.settings import Settings

WORKERS = PREFIX + "workers"  # set of advertised worker names (members whose hash expired are pruned on read)


def worker_key(name: str) -> str:
    return PREFIX + "worker:" + name


def known_queues(settings: Settings) -> list[str]:
    """The queues a job may be put on: the default queue first, then the resource queues."""
    names = [settings.queue_name]
    for name in [*settings.queues, *settings.resource_queues.values()]:
        if name not in names:
            names.append(name)
    return names


def choose_queue(settings: Settings, requested: str | None, base_model: str) -> str:
    """The queue of a new job; an unknown requested name is the client's error (400)."""
    if requested is not None:
        if requested not in known_queues(settings):
            raise InvalidRequest(
                f"unknown queue {requested!r}; this server's queues: {', '.join(known_queues(settings))} (BONE_QUEUES)",
                param="queue",
                code="unknown_queue",
            )
        return requested
    return settings.resource_queues.get(base_model, settings.queue_name)


# --- the device a worker runs on ---------------------------------------------------------------------------
class DeviceUnavailable(ValueError):
    """The device a worker was told to use does not exist here: a start-up error, said in one line."""


def check_device(device: Any, setting: str) -> None:
    """Refuse a CUDA device this machine does not have. ``torch.cuda.device_count`` is NVML-based in the worker
    (PYTORCH_NVML_BASED_CUDA_CHECK), so asking does not initialise CUDA in the forking parent."""
    import torch

    if device.type != "cuda":
        return
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceUnavailable(f"{setting}: this machine has no CUDA device (torch sees none); use cpu or auto")
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(
            f"{setting}: no such GPU; this machine has {count} (cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})"
        )


# --- what a worker advertises ---------------------------------------------------------------------------------
def advertise(conn: redis.Redis, name: str, info: dict[str, Any], ttl_s: int) -> None:
    """Write (or refresh) a worker's advert; it disappears ``ttl_s`` after the last refresh."""
    key = worker_key(name)
    mapping = {k: json.dumps(v) for k, v in info.items()} | {"heartbeat": json.dumps(time.time())}
    with conn.pipeline() as pipe:
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, ttl_s)
        pipe.sadd(WORKERS, name)
        pipe.execute()


def withdraw(conn: redis.Redis, name: str) -> None:
    with conn.pipeline() as pipe:
        pipe.delete(worker_key(name))
        pipe.srem(WORKERS, name)
        pipe.execute()


def live_workers(conn: redis.Redis) -> list[dict[str, Any]]:
    """Every worker whose advert has not expired, with the job it is running now (RQ's record), by name."""
    out = []
    for raw_name in sorted(conn.smembers(WORKERS)):
        name = raw_name.decode() if isinstance(raw_name, bytes) else raw_name
        raw = conn.hgetall(worker_key(name))
        if not raw:
            conn.srem(WORKERS, name)  # expired: the worker died or stopped without withdrawing
            continue
        info = {k.decode(): json.loads(v) for k, v in raw.items()}
        current = conn.hget(f"rq:worker:{name}", "current_job")
        state = conn.hget(f"rq:worker:{name}", "state")
        info.update(
            name=name, current_job=current.decode() if current else None, state=state.decode() if state else None
        )
        out.append(info)
    return out


def queue_summary(conn: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Known queues plus any queue a live worker serves: depth (jobs waiting), running jobs, workers."""
    workers = live_workers(conn)
    names = known_queues(settings)
    for worker in workers:
        names.extend(q for q in worker.get("queues", []) if q not in names)
    out = []
    for name in names:
        serving = [w for w in workers if name in w.get("queues", [])]
        out.append(
            {
                "object": "queue",
                "name": name,
                "default": name == settings.queue_name,
                "known": name in known_queues(settings),
                "depth": conn.llen(f"rq:queue:{name}"),
                "running": conn.zcard(f"rq:wip:{name}"),
                "workers": len(serving),
                "busy_workers": sum(1 for w in serving if w.get("current_job")),
            }
        )
    return out
