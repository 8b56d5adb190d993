"""Fine-tuning jobs: create (validate + enqueue), list, read, cancel, events (JSON pages or live SSE).

Handlers are plain ``def``: Redis calls block, so FastAPI runs them in its thread pool. The training task is
enqueued by its dotted path; this process never imports ``worker``.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from sse_starlette.sse import EventSourceResponse

from app.auth import PrincipalDep
from app.deps import FilesDep, JobCheckerDep, JobStoreDep, QueueDep, RegistryDep, SettingsDep
from app.schemas import Listing, Page
from core.access import OwnedJobs
from core.errors import Conflict, InvalidRequest
from core.fleet import choose_queue
from core.jobs import FileDataset, Job, JobCreate, JobStatus, dataset_summary
from core.jobstore import check_event_id
from core.published_checkpoints import unpublish_checkpoints
from core.queueing import TRAINING_TASK, enqueue
from core.quotas import check_adapter_count, release_active, reserve_active

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])

EVENT_POLL_MS = 1000  # below the Redis client's socket timeout, so a blocking read never times out the socket


class JobList(Page[Job]):
    pass


class Checkpoint(BaseModel):
    """One saved checkpoint, as the worker records it. The optional fields are absent (not null) in a record
    written without them, which the route passes on as stored (``response_model_exclude_unset``)."""

    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    job_id: str
    step: int
    created_at: float | None = None
    adapter: str | None = Field(
        None, description="the adapter it was published as (training.publish_checkpoints), else null"
    )
    train_loss: float | None = None
    eval_loss: float | None = None


class CheckpointList(Listing[Checkpoint]):
    pass


class JobEvent(BaseModel):
    type: str = Field(description="status, step, eval, epoch, checkpoint, resumed, message, retry, error, ...")
    message: str
    created_at: float
    data: dict[str, Any] = Field(description="the event's own fields (e.g. step, loss, lr; status)")
    id: str = Field(description="the Redis stream id; pass it as `after` (or Last-Event-ID) to read on from here")


class JobEventList(Page[JobEvent]):
    pass


@router.post("", status_code=202, response_model=Job)
def create_job(
    body: JobCreate,
    settings: SettingsDep,
    store: JobStoreDep,
    queue: QueueDep,
    registry: RegistryDep,
    files: FilesDep,
    checker: JobCheckerDep,
    principal: PrincipalDep,
) -> Job:
    registry.check_name_free(body.adapter_name, for_job=True)
    for param, spec in (("dataset", body.dataset), ("validation_dataset", body.validation_dataset)):
        if isinstance(spec, FileDataset):  # a job may train only on its owner's uploaded files
            files.check_usable(spec.file_id, f"{param}.file_id")
    records, validation_records = checker.check(body)
    base_model = body.base_model or settings.base_model
    queue_name = choose_queue(settings, body.queue, base_model)  # 400 for an unknown queue
    if body.training.num_processes > settings.max_num_processes:
        raise InvalidRequest(
            f"training.num_processes={body.training.num_processes} exceeds the server's limit of "
            f"{settings.max_num_processes} (BONE_MAX_NUM_PROCESSES)",
            param="training.num_processes",
        )
    if body.training.num_nodes > settings.max_num_nodes:
        raise InvalidRequest(
            f"training.num_nodes={body.training.num_nodes} exceeds the server's limit of "
            f"{settings.max_num_nodes} (BONE_MAX_NUM_NODES)",
            param="training.num_nodes",
        )
    estimate = checker.check_device_memory(body, queue.connection, queue_name)  # 422 when no device fits
    job = Job(
        id=Job.new_id(),
        adapter_name=body.adapter_name,
        base_model=base_model,
        dataset=dataset_summary(body.dataset),
        bone=body.bone,
        training=body.training,
        overwrite=body.overwrite,
        validation_dataset=None if body.validation_dataset is None else dataset_summary(body.validation_dataset),
        queue=queue_name,
        estimated_device_bytes=estimate.total,
        estimated_base_bytes=estimate.base + estimate.gathered,
    )
    conn = queue.connection
    check_adapter_count(registry, principal, body.adapter_name, settings.max_adapters_per_owner)
    reserve_active(conn, principal, job.id, settings.max_active_jobs_per_owner)
    # The record and RQ's queue entry in one MULTI/EXEC: a job is stored and queued, or (Redis gone) neither,
    # and the client gets a 503 for a job that does not exist. One round trip.
    try:
        with conn.pipeline(transaction=True) as pipe:
            pipe.multi()  # explicit MULTI first: RQ, handed a pipeline, starts one itself unless it is already open
            store.create(
                job,
                records=records,
                validation_records=validation_records,
                pipeline=pipe,
                records_ttl_s=settings.inline_records_ttl_s,
            )
            enqueue(conn, settings, TRAINING_TASK, job.id, queue=queue_name, pipeline=pipe)
            pipe.execute()
    except Exception:
        try:
            release_active(conn, principal, job.id)
        except Exception:  # noqa: BLE001 - Redis is likely gone; the quota check drops the stale entry later
            pass
        raise
    log.info("queued %s for adapter %r", job.id, job.adapter_name)
    return job


@router.get("", response_model=JobList)
def list_jobs(
    store: JobStoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=256, description="id of the last job of the previous page")] = None,
) -> JobList:
    jobs, has_more = store.list(limit=limit, after=after)
    return JobList(data=jobs, has_more=has_more)


@router.get("/{job_id}", response_model=Job)
def get_job(job_id: str, store: JobStoreDep) -> Job:
    return store.get(job_id)


@router.post("/{job_id}/cancel", response_model=Job)
def cancel_job(job_id: str, store: JobStoreDep, queue: QueueDep, registry: RegistryDep) -> Job:
    """Queued: cancelled at once and never runs. Running: the worker stops at its next step and records
    ``cancelled`` itself. Already final: 409."""
    job = store.get(job_id)
    if job.status.is_final:
        raise Conflict(f"job {job_id} is already {job.status.value}", param="job_id", code="invalid_state")
    store.request_cancel(job_id)  # first, so a worker that picks the job up right now sees it
    if job.status is JobStatus.QUEUED:
        try:
            RQJob.fetch(job_id, connection=queue.connection).cancel()
        except NoSuchJobError:
            pass  # already taken off the queue by a worker; the flag stops it
        try:
            job = store.transition(job_id, [JobStatus.QUEUED], status=JobStatus.CANCELLED, finished_at=time.time())
            # Queued again after its worker died, it may have published checkpoints: a cancelled job has none.
            unpublish_checkpoints(store, registry, job)
            store.add_event(job_id, "status", "cancelled while queued; nothing was published", status="cancelled")
            return job
        except Conflict:
            pass  # a worker started it in between: it is running now and will honour the flag
    return store.get(job_id)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, response_model_exclude_unset=True)
def job_checkpoints(job_id: str, store: JobStoreDep) -> dict:
    """The job's checkpoints so far: step, train/eval loss and, with ``training.publish_checkpoints``, the
    name of the adapter each one was published as (usable in /generate at once)."""
    store.get(job_id)  # 404 first
    return {
        "object": "list",
        "data": [{"object": "fine_tuning.job.checkpoint", "job_id": job_id, **c} for c in store.checkpoints(job_id)],
        "has_more": False,
    }


@router.get("/{job_id}/events", response_model=JobEventList)  # or SSE: see app/openapi.py STREAMING
async def job_events(
    job_id: str,
    request: Request,
    store: JobStoreDep,
    after: Annotated[str | None, Query(max_length=256, description="id of the last event already seen")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    stream: bool = False,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    job = await run_in_threadpool(store.get, job_id)  # 404 before any stream starts
    wants_stream = stream or "text/event-stream" in request.headers.get("accept", "")
    check_event_id(after)
    if wants_stream:
        check_event_id(last_event_id, param="Last-Event-ID")
        return EventSourceResponse(_follow(store, job, after or last_event_id), ping=15)
    events = await run_in_threadpool(lambda: store.events(job_id, after=after, limit=limit + 1))
    return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}


async def _follow(store: OwnedJobs, job: Job, after: str | None):
    """Every event after ``after``, then live ones until the job is final; the last message is the job."""
    last, final = after, job.status.is_final
    while True:
        block = None if final else EVENT_POLL_MS
        events = await anyio.to_thread.run_sync(partial(store.events, job.id, after=last, limit=100, block_ms=block))
        for event in events:
            last = event["id"]
            yield {"id": event["id"], "event": "event", "data": json.dumps(event)}
        if final and not events:
            yield {"event": "end", "data": job.model_dump_json()}
            return
        if not final:
            job = await anyio.to_thread.run_sync(store.get, job.id)
            final = job.status.is_final  # one more pass drains what the worker wrote before finishing
