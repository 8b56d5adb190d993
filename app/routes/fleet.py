"""The worker fleet: ``GET /workers`` (live workers: device, memory, queues, current job, heartbeat) and
``GET /queues`` (each queue's depth, running jobs and the workers serving it). See core/fleet.py."""

from __future__ import annotations

import json
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.auth import PrincipalDep
from app.deps import RedisDep, SettingsDep
from app.schemas import Listing
from core.fleet import live_workers, queue_summary
from core.quotas import record_key

router = APIRouter(tags=["fleet"])


class Worker(BaseModel):
    """A worker's advert (written by the worker process: worker/main.py ``describe_device``) plus what RQ
    says it is doing. The advert may come from another version of the worker, so its fields pass through as
    written: unknown ones kept (``extra="allow"``), missing ones left out rather than shown as null
    (``response_model_exclude_unset``); the GPU fields are there only on CUDA workers."""

    model_config = ConfigDict(extra="allow")

    object: Literal["worker"] = "worker"
    host: str | None = None
    pid: int | None = None
    device: str | None = Field(None, description="cpu or cuda")
    cpus: int | None = None
    memory_bytes: int | None = Field(None, description="host memory; null when it could not be read")
    max_num_processes: int | None = None
    started_at: float | None = None
    gpus: int | None = None
    gpu_names: list[str] | None = None
    gpu_memory_bytes: list[int] | None = None
    queues: list[str] | None = None
    heartbeat: float | None = Field(None, description="when the advert was last refreshed (unix time)")
    name: str = Field(description="the RQ worker name")
    current_job: str | None = Field(description="id of the job it is running, if any")
    state: str | None = Field(description="RQ's worker state (idle, busy, ...)")


class QueueInfo(BaseModel):
    object: Literal["queue"] = "queue"
    name: str
    default: bool = Field(description="the server's default queue (BONE_QUEUE_NAME)")
    known: bool = Field(
        description="jobs may be put on it (BONE_QUEUES, BONE_RESOURCE_QUEUES); false: only a live worker serves it"
    )
    depth: int = Field(description="jobs waiting")
    running: int
    workers: int = Field(description="live workers serving it")
    busy_workers: int


class WorkerList(Listing[Worker]):
    pass


class QueueList(Listing[QueueInfo]):
    pass


@router.get("/workers", response_model=WorkerList, response_model_exclude_unset=True)
def list_workers(conn: RedisDep, principal: PrincipalDep) -> dict:
    """Every live worker. A user key sees the id of a worker's current job only when the job is its own owner's
    (another owner's job shows as null, the worker as busy); an admin key sees all."""
    workers = live_workers(conn)
    if not principal.is_admin:
        hide_foreign_jobs(conn, workers, principal.owner)
    return {"object": "list", "data": [{"object": "worker", **w} for w in workers], "has_more": False}


def hide_foreign_jobs(conn, workers: list[dict], owner: str | None) -> None:
    ids = [w["current_job"] for w in workers if w.get("current_job")]
    if not ids:
        return
    owners = {}
    for job_id, raw in zip(ids, conn.mget([record_key(i) for i in ids])):
        try:
            owners[job_id] = json.loads(raw).get("owner") if raw is not None else None
        except (ValueError, AttributeError):
            owners[job_id] = None
    for worker in workers:
        job_id = worker.get("current_job")
        if job_id and (owner is None or owners.get(job_id) != owner):
            worker["current_job"] = None


@router.get("/queues", response_model=QueueList)
def list_queues(conn: RedisDep, settings: SettingsDep) -> dict:
    return {"object": "list", "data": queue_summary(conn, settings), "has_more": False}
