"""Finds running jobs whose process died and re-queues them (they resume from their last checkpoint).

RQ alone notices a SIGKILLed worker after 90-810 s and then only marks the job failed
(shared/reference/rq-redis-notes.md). Here, every process that trains a job keeps a short-lived heartbeat
key alive (worker/heartbeat.py); a janitor thread runs in every worker process and in the API, and every
``janitor_interval_s`` one of them (a short Redis lock picks it) looks at the ``running`` jobs:

* heartbeat alive                      -> fine
* heartbeat gone, attempts < max       -> status ``queued`` again, a ``retry`` event, enqueued again
* heartbeat gone, attempts == max      -> ``failed``, naming the cause

and at the jobs a co-training worker claimed off a queue but did not start before it died (core/claims.py):
they go back to the front of their queue.

Only jobs a worker actually started (``started_at`` set) are judged, and only after one heartbeat TTL, so a
job that has just started is never taken for dead. Lives in ``core`` because the API runs it too (the API
never imports ``worker``): a job never stays ``running`` forever, even with no worker left.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from typing import TYPE_CHECKING

import redis

from core.claims import sweep_claims
from core.errors import Conflict, NotFound, ServiceError
from core.jobs import JobStatus
from core.jobstore import JobStore
from core.queueing import TRAINING_TASK, enqueue
from core.records import PREFIX
from core.settings import Settings

if TYPE_CHECKING:
    from core.storage.resume_state import ResumeStore

log = logging.getLogger(__name__)

LOCK_KEY = PREFIX + "janitor:lock"


def recover(conn: redis.Redis, settings: Settings, job_id: str, attempt: int, reason: str) -> str | None:
    """Attempt ``attempt`` of a running job is dead: re-queue it, or fail it after ``max_attempts``.
    Returns the new status, or None when the job had moved on (final, or another attempt)."""
    store = JobStore(conn)
    try:
        job = store.get(job_id)
        if job.attempts >= settings.max_attempts:
            error = f"{reason}; gave up after {job.attempts} attempts (BONE_MAX_ATTEMPTS)"
            store.transition(
                job_id,
                [JobStatus.RUNNING],
                attempt=attempt,
                status=JobStatus.FAILED,
                error=error,
                finished_at=time.time(),
            )
            store.add_event(job_id, "error", error)
            store.add_event(job_id, "status", error, status="failed")
            log.error("job %s failed: %s", job_id, error)
            return "failed"
        store.transition(job_id, [JobStatus.RUNNING], attempt=attempt, status=JobStatus.QUEUED, error=None)
    except (Conflict, NotFound):
        return None
    store.clear_heartbeat(job_id)
    _forget_rq_execution(conn, settings, job_id, job.queue)
    store.add_event(
        job_id,
        "retry",
        f"{reason}; queued again (attempt {attempt + 1} of {settings.max_attempts}) to resume from its last checkpoint",
        attempt=attempt,
        reason=reason,
    )
    # At the front, ahead of newer jobs: this one has work done already.
    enqueue(conn, settings, TRAINING_TASK, job_id, queue=job.queue, at_front=True)
    log.warning("job %s: %s; re-queued (attempt %d of %d)", job_id, reason, attempt + 1, settings.max_attempts)
    return "queued"


def _forget_rq_execution(conn: redis.Redis, settings: Settings, job_id: str, queue: str | None = None) -> None:
    """Drop the dead execution from RQ's started registry, so RQ's own cleanup (90+ s later) never reports
    the re-queued job as abandoned. Best effort: worker.main's handler ignores such reports anyway."""
    name = queue or settings.queue_name  # the job's own (resource) queue
    key = f"rq:wip:{name}"
    for member, _ in conn.zscan_iter(key, match=f"{job_id}:*"):
        conn.zrem(key, member)
    conn.zrem(f"rq:failed:{name}", job_id)


def sweep(conn: redis.Redis, settings: Settings, *, now: float | None = None) -> list[str]:
    """One pass over the running jobs; returns the ids it re-queued or failed."""
    store = JobStore(conn)
    now = time.time() if now is None else now
    acted = []
    for job_id in store.running_ids():
        try:
            job = store.get(job_id)
        except NotFound:
            store.forget_running(job_id)
            continue
        if job.status is not JobStatus.RUNNING:
            store.forget_running(job_id)
            continue
        if job.started_at is None or now - job.started_at < settings.heartbeat_ttl_s:
            continue  # not started by a worker, or too recently to judge
        if store.heartbeat(job_id) is not None:
            continue
        # A cause recorded by the worker that saw the process die (worker.main.record_death) beats a guess.
        reason = (
            job.error
            or f"the worker running attempt {job.attempts} stopped (no heartbeat for {settings.heartbeat_ttl_s:g} s)"
        )
        if recover(conn, settings, job_id, job.attempts, reason):
            acted.append(job_id)
    # Jobs a co-training worker claimed off the queue but never started (core/claims.py)
    acted += sweep_claims(conn, settings, now=now)
    return acted


def sweep_workdirs(store: JobStore, settings: Settings, *, min_age_s: float = 60.0) -> int:
    """Remove work dirs of jobs that are final (e.g. cancelled while waiting for a retry) or unknown."""
    removed = 0
    if not settings.jobs_dir.is_dir():
        return 0
    for entry in settings.jobs_dir.iterdir():
        if not entry.name.startswith("job-") or time.time() - entry.stat().st_mtime < min_age_s:
            continue
        try:
            final = store.get(entry.name).status.is_final
        except NotFound:
            final = True
        if final:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def sweep_shared_checkpoints(
    store: JobStore, settings: Settings, *, min_age_s: float = 60.0, shared: ResumeStore | None = None
) -> int:
    """Remove the checkpoints in the registry's store of jobs that are final (a job failed here after its
    last attempt's worker died, or cancelled while queued for a retry, has no worker to remove them) or
    unknown (after ``min_age_s``: a record is written before any worker starts the job)."""
    from core.storage.resume_state import ResumeStore

    shared = shared or ResumeStore.from_settings(settings)
    removed = 0
    for job_id in shared.job_ids():
        try:
            final = store.get(job_id).status.is_final
        except NotFound:
            final = shared.age_s(job_id) >= min_age_s
        if final:
            shared.remove(job_id)
            removed += 1
    return removed


class Janitor:
    """The sweep on a daemon thread; of all janitors sharing a Redis, one acts per interval."""

    def __init__(self, settings: Settings, *, clean_workdirs: bool = False) -> None:
        self.settings = settings
        self.clean_workdirs = clean_workdirs
        self._shared: ResumeStore | None = None
        self.name = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bone-janitor", daemon=True)

    def start(self) -> Janitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        interval = self.settings.janitor_interval_s
        conn = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        try:
            while not self._stop.wait(interval):
                try:
                    # The lock lives a little less than one interval: one janitor per interval acts.
                    if conn.set(LOCK_KEY, self.name, nx=True, px=max(100, int(interval * 900))):
                        sweep(conn, self.settings)
                        try:
                            if self._shared is None:  # one store client for the thread's life
                                from core.storage.resume_state import ResumeStore

                                self._shared = ResumeStore.from_settings(self.settings)
                            sweep_shared_checkpoints(JobStore(conn), self.settings, shared=self._shared)
                        except ServiceError as exc:  # the registry's store unreachable: next time
                            log.warning("janitor: could not sweep checkpoints in the registry's store: %s", exc)
                    if self.clean_workdirs:
                        sweep_workdirs(JobStore(conn), self.settings)
                except redis.RedisError as exc:
                    log.warning("janitor: Redis unreachable: %s", exc)
                except Exception:  # noqa: BLE001 - the janitor must outlive any one bad record
                    log.exception("janitor sweep failed")
        finally:
            conn.close()
