"""Job records in Redis, shared by the API (create, list, cancel) and the workers (status, progress).

Keys (all under ``bone:``):
  job:{id}          the Job as JSON
  jobs              sorted set of ids by creation time (listing, cursor pagination)
  jobs:owner:{owner}  the same, one owner's only: a user's listing reads only their own records
  owner:{owner}:active  sorted set of the owner's queued and running job and evaluation ids, by when they
                    were reserved (the active-jobs quota, core/quotas.py)
  job:{id}:records  inline dataset rows (kept apart so listings stay small); deleted when the job ends and
                    given a TTL when stored (BONE_INLINE_RECORDS_TTL_S), so no path leaves them behind
  job:{id}:cancel   cooperative-cancel flag the training loop polls. A separate key on purpose: RQ's
                    ``save_meta()`` rewrites the whole meta field, so a flag kept in ``job.meta`` is lost
                    (shared/reference/rq-redis-notes.md).
  job:{id}:events   a Redis stream of per-step metrics and messages
  job:{id}:validation_records  inline validation rows
  job:{id}:heartbeat  refreshed every few seconds by the process training the job (short TTL): when it is
                    gone while the job is ``running``, that process is dead (see core/janitor.py)
  job:{id}:checkpoints  hash step → checkpoint summary (GET /jobs/{id}/checkpoints)
  jobs:running      set of ids whose status is ``running`` (what the janitor scans)
  jobs:status_counts  a hash status → number of jobs (for /metrics without scanning every job)
"""

from __future__ import annotations

import builtins
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from pydantic import ValidationError
from redis.client import Pipeline

from core.errors import Conflict, InvalidRequest, NotFound, ServiceError
from core.jobs import STORED, Job, JobStatus

if TYPE_CHECKING:
    from core.evals import Evaluation

# the two stored record kinds (both carry an owner and a status): a Job, or core.evals' Evaluation
T = TypeVar("T", "Job", "Evaluation")
S = TypeVar("S", "Job", "Evaluation")  # a record with a ``status``

PREFIX = "bone:"
STATUS_COUNTS = PREFIX + "jobs:status_counts"  # jobs by status, kept in step with every transition (metrics)
# The workers' latest training figures, pushed here so the API's /metrics exports them (workers open no port).
TRAINING_METRICS = PREFIX + "metrics:training"
RUNNING = PREFIX + "jobs:running"
EVENTS_MAXLEN = 100_000
EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # a Redis stream id, the only cursor the events listing hands out
INLINE_RECORDS_TTL_S = 7 * 24 * 3600  # default of BONE_INLINE_RECORDS_TTL_S

log = logging.getLogger(__name__)


def check_event_id(after: str | None, param: str = "after") -> None:
    """A cursor (query ``after`` or SSE's ``Last-Event-ID``) must be an id this store handed out: Redis refuses
    anything else with an error that is not the client's to read."""
    # Each part below 2**64 too: a 20-digit part past it passes the pattern and Redis refuses it just the same.
    if after is not None and (not EVENT_ID.fullmatch(after) or any(int(part) >= 2**64 for part in after.split("-"))):
        raise InvalidRequest(f"{param} must be an event id such as '1700000000000-0', not {after[:40]!r}", param=param)


class UnreadableRecord(ServiceError):
    code = "unreadable_record"


def owner_index(index: str, owner: str) -> str:
    return f"{index}:owner:{owner}"


def active_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}:active"


_indexed: set[str] = set()  # indexes whose per-owner copies this process has checked (see ensure_owner_index)
_indexed_lock = threading.Lock()


def ensure_owner_index(conn: redis.Redis, index: str, key_of: Callable[[str], str]) -> None:
    """Records stored before per-owner indexes existed get indexed once (a marker key says it is done)."""
    with _indexed_lock:
        if index in _indexed:
            return
        marker = index + ":owner_index_v1"
        if not conn.exists(marker):
            entries = [(i.decode(), score) for i, score in conn.zrange(index, 0, -1, withscores=True)]
            for chunk in range(0, len(entries), 500):
                part = entries[chunk : chunk + 500]
                pipe = conn.pipeline(transaction=False)
                for (record_id, score), raw in zip(part, conn.mget([key_of(i) for i, _ in part])):
                    try:
                        owner = json.loads(raw).get("owner") if raw is not None else None
                    except (ValueError, AttributeError):
                        owner = None
                    if isinstance(owner, str) and owner:
                        pipe.zadd(owner_index(index, owner), {record_id: score})
                pipe.execute()
            conn.set(marker, "1")
        _indexed.add(index)


def page_newest_first(
    conn: redis.Redis,
    index: str,
    key_of: Callable[[str], str],
    model: type[T],
    *,
    limit: int,
    after: str | None,
    owner: str | None,
    what: str,
) -> tuple[list[T], bool]:
    """One page of records indexed by creation time in the sorted set ``index``, newest first, optionally only
    ``owner``'s (read from that owner's own index: another owner's records are never even fetched). ``after``
    is the last id of the previous page. A record that no longer validates (written by an older version, or
    damaged) is skipped and logged: one bad record must not take the listing down for everyone. Returns
    (records, has_more)."""
    if owner is not None:
        ensure_owner_index(conn, index, key_of)
        index = owner_index(index, owner)
    start = 0
    if after is not None:
        rank = conn.zrevrank(index, after)
        if rank is None:
            raise NotFound(f"no {what} with id {after!r}", param="after")
        start = rank + 1
    found: list[T] = []
    # Records may be missing or skipped, so read in chunks until the page is full.
    while len(found) <= limit:
        ids = conn.zrevrange(index, start, start + limit)
        if not ids:
            break
        start += len(ids)
        for record_id, raw in zip(ids, conn.mget([key_of(i.decode()) for i in ids])):
            if raw is None:
                continue
            try:
                record = model.model_validate_json(raw, context=STORED)
            except ValidationError as exc:
                log.warning(
                    "skipping %s %s in a listing: its record no longer validates (%d errors, first: %s)",
                    what,
                    record_id.decode(),
                    exc.error_count(),
                    exc.errors()[0].get("msg"),
                )
                continue
            if owner is None or record.owner == owner:
                found.append(record)
    return found[:limit], len(found) > limit


def read_record(model: type[T], raw: bytes, what: str, record_id: str) -> T:
    """One stored record; one that no longer validates is a server-side fault named in the envelope."""
    try:
        return model.model_validate_json(raw, context=STORED)
    except ValidationError as exc:
        log.error("%s %s: stored record no longer validates: %s", what, record_id, exc)
        raise UnreadableRecord(f"{what} {record_id} has a stored record this server cannot read") from None


def index_new(pipe: Pipeline, index: str, record_id: str, created_at: float, owner: str | None) -> None:
    """Add a new record to the listing index (and its owner's, and the owner's active set)."""
    pipe.zadd(index, {record_id: created_at})
    if owner is not None:
        pipe.zadd(owner_index(index, owner), {record_id: created_at})
        pipe.zadd(active_key(owner), {record_id: created_at}, nx=True)  # nx: keep the quota's reservation time


def settle_ended(pipe: Pipeline, key: str, before: Any, after: Any) -> None:
    """A record that just reached a final state: its inline rows go (nothing will read them again) and it no
    longer counts against its owner's active quota."""
    if after.status.is_final and not before.status.is_final:
        pipe.delete(key + ":records", key + ":validation_records")
        if after.owner is not None:
            pipe.zrem(active_key(after.owner), after.id)


def transition_record(
    conn: redis.Redis,
    key: str,
    model: type[S],
    allowed: set[JobStatus],
    fields: dict[str, Any],
    *,
    what: str,
    record_id: str,
    param: str,
    check: Callable[[S], None] | None = None,
    finish: Callable[[S], S] | None = None,
    also: Callable[[Pipeline, S, S], None] | None = None,
) -> S:
    """Atomically move the record at ``key`` (a job or an evaluation) to ``fields``: WATCH it, refuse unless its
    status is in ``allowed`` (and ``check`` passes), MULTI-write the updated record together with whatever
    ``also(pipe, before, after)`` adds, and start over if someone else wrote it meanwhile."""
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is None:
                    raise NotFound(f"no {what} with id {record_id!r}", param=param)
                before = model.model_validate_json(raw, context=STORED)
                if before.status not in allowed:
                    raise Conflict(f"{what} {record_id} is {before.status.value}", param=param, code="invalid_state")
                if check is not None:
                    check(before)
                after = model.model_validate(
                    {**before.model_dump(), **fields}, context=STORED
                )  # validates the new fields too
                if finish is not None:
                    after = finish(after)
                pipe.multi()
                pipe.set(key, after.model_dump_json())
                if also is not None:
                    also(pipe, before, after)
                pipe.execute()
                return after
            except redis.WatchError:
                continue


def non_final(allowed_from: Iterable[JobStatus] | None) -> set[JobStatus]:
    return set(allowed_from) if allowed_from is not None else {s for s in JobStatus if not s.is_final}


def _job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


class JobStore:
    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

    # --- create / read ----------------------------------------------------------------------------------
    def create(
        self,
        job: Job,
        records: list[dict[str, Any]] | None = None,
        validation_records: list[dict[str, Any]] | None = None,
        *,
        pipeline: Pipeline | None = None,
        records_ttl_s: int = INLINE_RECORDS_TTL_S,
    ) -> None:
        """Store a new job. With ``pipeline`` the writes join it and the caller executes it: the API queues the
        job for RQ in the same MULTI/EXEC, so a job is stored and queued, or neither, in one round trip.
        Inline rows expire after ``records_ttl_s`` even if the job never ends (they are deleted when it does)."""
        pipe = pipeline if pipeline is not None else self.conn.pipeline(transaction=True)
        pipe.set(_job_key(job.id), job.model_dump_json())
        if records is not None:
            pipe.set(_job_key(job.id) + ":records", json.dumps(records), ex=records_ttl_s)
        if validation_records is not None:
            pipe.set(_job_key(job.id) + ":validation_records", json.dumps(validation_records), ex=records_ttl_s)
        index_new(pipe, PREFIX + "jobs", job.id, job.created_at, job.owner)
        pipe.hincrby(STATUS_COUNTS, job.status.value, 1)
        if pipeline is None:
            pipe.execute()

    def get(self, job_id: str) -> Job:
        raw = self.conn.get(_job_key(job_id))
        if raw is None:
            raise NotFound(f"no job with id {job_id!r}", param="job_id")
        return read_record(Job, raw, "job", job_id)

    def stored_owner(self, job_id: str) -> str | None:
        """The owner named in a job's stored record, read without validating the rest of it."""
        raw = self.conn.get(_job_key(job_id))
        try:
            owner = json.loads(raw).get("owner") if raw is not None else None
        except (ValueError, AttributeError):
            return None
        return owner if isinstance(owner, str) else None

    def records(self, job_id: str, which: str = "records") -> list[dict[str, Any]] | None:
        """Inline rows: ``which`` is "records" or "validation_records"."""
        raw = self.conn.get(_job_key(job_id) + ":" + which)
        return None if raw is None else json.loads(raw)

    def list(self, *, limit: int = 20, after: str | None = None, owner: str | None = None) -> tuple[list[Job], bool]:
        """Newest first. ``after`` is the id of the last job of the previous page. Returns (jobs, has_more)."""
        return page_newest_first(
            self.conn, PREFIX + "jobs", _job_key, Job, limit=limit, after=after, owner=owner, what="job"
        )

    # --- updates --------------------------------------------------------------------------------------
    def update(self, job_id: str, **fields: Any) -> Job:
        """Set fields unless the job already reached a final state (a cancelled job stays cancelled)."""
        return self.transition(job_id, None, **fields)

    def transition(
        self, job_id: str, allowed_from: Iterable[JobStatus] | None, *, attempt: int | None = None, **fields: Any
    ) -> Job:
        """Atomically update a job (WATCH/MULTI), only from ``allowed_from`` states (default: any non-final)
        and, with ``attempt``, only while ``job.attempts`` is still that (a later attempt's record stands)."""

        def same_attempt(job: Job) -> None:
            if attempt is not None and job.attempts != attempt:
                raise Conflict(
                    f"job {job_id} is on attempt {job.attempts}, not {attempt}", param="job_id", code="invalid_state"
                )

        def settle(job: Job) -> Job:
            if job.status.is_final:  # a finished job is in no phase and has nothing left to wait for
                job.progress = job.progress.model_copy(update={"phase": None, "eta_s": None})
            return job

        def count(pipe: Pipeline, before: Job, after: Job) -> None:
            if after.status is before.status:
                return
            settle_ended(pipe, _job_key(job_id), before, after)
            pipe.hincrby(STATUS_COUNTS, before.status.value, -1)
            pipe.hincrby(STATUS_COUNTS, after.status.value, 1)
            if after.status is JobStatus.RUNNING:
                pipe.sadd(RUNNING, job_id)
            elif before.status is JobStatus.RUNNING:
                pipe.srem(RUNNING, job_id)

        return transition_record(
            self.conn,
            _job_key(job_id),
            Job,
            non_final(allowed_from),
            fields,
            what="job",
            record_id=job_id,
            param="job_id",
            check=same_attempt,
            finish=settle,
            also=count,
        )

    # --- cancel ---------------------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        self.conn.set(_job_key(job_id) + ":cancel", "1", ex=7 * 24 * 3600)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.conn.exists(_job_key(job_id) + ":cancel"))

    # --- events ---------------------------------------------------------------------------------------
    def record_training_step(self, tokens_per_s: float, step_time_s: float) -> None:
        pipe = self.conn.pipeline(transaction=False)
        pipe.hset(TRAINING_METRICS, mapping={"tokens_per_s": tokens_per_s, "step_time_s": step_time_s})
        pipe.hincrby(TRAINING_METRICS, "steps_total", 1)
        pipe.execute()

    def add_event(self, job_id: str, kind: str, message: str = "", **data: Any) -> str:
        entry = {"type": kind, "message": message, "created_at": time.time(), "data": data}
        event_id = self.conn.xadd(
            _job_key(job_id) + ":events", {"event": json.dumps(entry)}, maxlen=EVENTS_MAXLEN, approximate=True
        )
        return event_id.decode() if isinstance(event_id, bytes) else event_id

    def events(
        self, job_id: str, *, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> builtins.list[dict[str, Any]]:
        key = _job_key(job_id) + ":events"
        check_event_id(after)
        if block_ms is not None:
            got = self.conn.xread({key: after or "0-0"}, count=limit, block=block_ms) or []
            entries = got[0][1] if got else []
        else:
            start = "(" + after if after else "-"
            entries = self.conn.xrange(key, min=start, max="+", count=limit)
        out = []
        for event_id, fields in entries:
            item = json.loads(fields[b"event"])
            item["id"] = event_id.decode() if isinstance(event_id, bytes) else event_id
            out.append(item)
        return out

    # --- liveness (see core/janitor.py) ------------------------------------------------------------------
    def beat(self, job_id: str, attempt: int, ttl_s: float) -> None:
        self.conn.set(_job_key(job_id) + ":heartbeat", str(attempt), px=int(ttl_s * 1000))

    def heartbeat(self, job_id: str) -> int | None:
        """The attempt whose process is alive, or None when no heartbeat is live."""
        raw = self.conn.get(_job_key(job_id) + ":heartbeat")
        return None if raw is None else int(raw)

    def clear_heartbeat(self, job_id: str) -> None:
        self.conn.delete(_job_key(job_id) + ":heartbeat")

    def running_ids(self) -> builtins.list[str]:
        return sorted(i.decode() for i in self.conn.smembers(RUNNING))

    def forget_running(self, job_id: str) -> None:
        self.conn.srem(RUNNING, job_id)

    # --- checkpoints ----------------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, summary: dict[str, Any]) -> None:
        self.conn.hset(_job_key(job_id) + ":checkpoints", str(step), json.dumps({"step": step, **summary}))

    def checkpoints(self, job_id: str) -> builtins.list[dict[str, Any]]:
        raw = self.conn.hgetall(_job_key(job_id) + ":checkpoints")
        return sorted((json.loads(v) for v in raw.values()), key=lambda c: c["step"])
