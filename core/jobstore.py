"""Job records in Redis, shared by the API (create, list, cancel) and the workers (status, progress): a
``RecordStore`` (core/records.py) plus what only training jobs have.

Keys (all under ``bone:``) besides those of every record (core/records.py):
  job:{id}:events       a Redis stream of per-step metrics and messages
  job:{id}:heartbeat    refreshed every few seconds by the process training the job (short TTL): when it is
                        gone while the job is ``running``, that process is dead (see core/janitor.py)
  job:{id}:checkpoints  hash step → checkpoint summary (GET /jobs/{id}/checkpoints)
  job:{id}:gang         a multi-node job's rendezvous endpoint and attempt, and job:{id}:node:{k} the heartbeat
                        of its node k (worker/nodes.py)
  jobs:running          set of ids whose status is ``running`` (what the janitor scans)
  job:{id}:co_trained   hash partner id -> "same" | "other" (its owner's or another's): every job it was
                        co-trained with, from which the record's co_trained_with / co_trained_with_others are set
  metrics:cotrain       co-training figures the workers push for /metrics (groups, last group size, rows)
  jobs:status_counts    a hash status → number of jobs (for /metrics without scanning every job)
"""

from __future__ import annotations

import builtins
import json
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from redis.client import Pipeline

from core.errors import Conflict, InvalidRequest
from core.jobs import Job, JobStatus
from core.records import PREFIX, RecordStore

STATUS_COUNTS = PREFIX + "jobs:status_counts"  # jobs by status, kept in step with every transition (metrics)
# The workers' latest training figures, pushed here so the API's /metrics exports them (workers open no port).
TRAINING_METRICS = PREFIX + "metrics:training"
RUNNING = PREFIX + "jobs:running"
# Co-training figures (worker side: record_cotrain_group / record_cotrain_rows; exported by app/metrics.py).
COTRAIN_METRICS = PREFIX + "metrics:cotrain"
EVENTS_MAXLEN = 100_000
EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # a Redis stream id, the only cursor the events listing hands out


def check_event_id(after: str | None, param: str = "after") -> None:
    """A cursor (query ``after`` or SSE's ``Last-Event-ID``) must be an id this store handed out: Redis refuses
    anything else with an error that is not the client's to read."""
    # Each part below 2**64 too: a 20-digit part past it passes the pattern and Redis refuses it just the same.
    if after is not None and (not EVENT_ID.fullmatch(after) or any(int(part) >= 2**64 for part in after.split("-"))):
        raise InvalidRequest(f"{param} must be an event id such as '1700000000000-0', not {after[:40]!r}", param=param)


class JobStore(RecordStore[Job]):
    def __init__(self, conn: redis.Redis) -> None:
        super().__init__(conn, Job, kind="job", what="job", param="job_id")

    def on_create(self, pipe: Pipeline, record: Job) -> None:
        pipe.hincrby(STATUS_COUNTS, record.status.value, 1)

    # --- updates --------------------------------------------------------------------------------------
    def update(self, job_id: str, **fields: Any) -> Job:
        """Set fields unless the job already reached a final state (a cancelled job stays cancelled)."""
        return self.transition(job_id, None, **fields)

    def transition(self, record_id: str, allowed_from: Iterable[JobStatus] | None = None, **fields: Any) -> Job:
        """Atomically update a job (WATCH/MULTI), only from ``allowed_from`` states (default: any non-final)
        and, with ``attempt=N`` (not a field), only while ``job.attempts`` is still N (a later attempt's record
        stands)."""
        attempt = fields.pop("attempt", None)

        def same_attempt(job: Job) -> None:
            if attempt is not None and job.attempts != attempt:
                raise Conflict(
                    f"job {record_id} is on attempt {job.attempts}, not {attempt}", param="job_id", code="invalid_state"
                )

        def settle(job: Job) -> Job:
            if job.status.is_final:  # a finished job is in no phase and has nothing left to wait for
                job.progress = job.progress.model_copy(update={"phase": None, "eta_s": None})
            return job

        return self.transition_checked(record_id, allowed_from, fields, check=same_attempt, finish=settle)

    def on_transition(self, pipe: Pipeline, before: Job, after: Job) -> None:
        if after.status is before.status:
            return
        pipe.hincrby(STATUS_COUNTS, before.status.value, -1)
        pipe.hincrby(STATUS_COUNTS, after.status.value, 1)
        if after.status is JobStatus.RUNNING:
            pipe.sadd(RUNNING, after.id)
        elif before.status is JobStatus.RUNNING:
            pipe.srem(RUNNING, after.id)

    # --- events ---------------------------------------------------------------------------------------
    def record_training_step(self, tokens_per_s: float, step_time_s: float) -> None:
        pipe = self.conn.pipeline(transaction=False)
        pipe.hset(TRAINING_METRICS, mapping={"tokens_per_s": tokens_per_s, "step_time_s": step_time_s})
        pipe.hincrby(TRAINING_METRICS, "steps_total", 1)
        pipe.execute()

    # --- co-training -----------------------------------------------------------------------------------
    def record_cotrain_group(self, size: int) -> None:
        """A co-training group formed (or changed) with ``size`` members: counts it and sets the members gauge."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.hincrby(COTRAIN_METRICS, "groups_total", 1)
        pipe.hset(COTRAIN_METRICS, "members", size)
        pipe.execute()

    def record_cotrain_left_out(self, jobs: int) -> None:
        """``jobs`` compatible queued jobs a group did not take because they would have slowed a member past
        BONE_COTRAIN_MAX_SLOWDOWN (they stay queued and run after, or in another worker's group)."""
        self.conn.hincrby(COTRAIN_METRICS, "left_out_slowdown_total", jobs)

    def record_cotrain_members(self, size: int) -> None:
        """The running group's size after a job joined or left (no new group counted)."""
        self.conn.hset(COTRAIN_METRICS, "members", size)

    def record_cotrain_rows(self, rows_per_job: Mapping[str, int]) -> None:
        """One co-trained micro-batch: ``rows_per_job`` = job id -> its rows in it. Exported as totals without
        per-job labels (unbounded cardinality): rows per job per micro-batch = rows_total / member_steps_total."""
        if not rows_per_job:
            return
        pipe = self.conn.pipeline(transaction=False)
        pipe.hincrby(COTRAIN_METRICS, "rows_total", sum(rows_per_job.values()))
        pipe.hincrby(COTRAIN_METRICS, "member_steps_total", len(rows_per_job))
        pipe.hincrby(COTRAIN_METRICS, "micro_batches_total", 1)
        pipe.execute()

    def add_co_trained_with(self, job: Job, partners: Iterable[Job]) -> Job:
        """Record that ``job`` trains in one batch with ``partners`` (added to what earlier groups recorded),
        with a ``co_training`` event naming the partners new to it. Record and event show its own owner's
        partner ids and only a count of other owners' (the Job fields)."""
        key = self.key(job.id) + ":co_trained"
        mapping = {p.id: "same" if p.owner == job.owner else "other" for p in partners if p.id != job.id}
        known = {k.decode(): v.decode() for k, v in self.conn.hgetall(key).items()}
        new = {i: kind for i, kind in mapping.items() if i not in known}
        if new:
            self.conn.hset(key, mapping=new)
            known.update(new)
            ids = sorted(i for i, kind in new.items() if kind == "same")
            others = sum(1 for kind in new.values() if kind == "other")
            named = ", ".join(ids) + (f"{' and ' if ids else ''}{others} job(s) of other owners" if others else "")
            self.add_event(
                job.id, "co_training", f"trains in one batch with {named}", co_trained_with=ids, others=others
            )
        try:
            return self.update(
                job.id,
                co_trained_with=sorted(i for i, kind in known.items() if kind == "same"),
                co_trained_with_others=sum(1 for kind in known.values() if kind == "other"),
            )
        except Conflict:  # final meanwhile (e.g. cancelled): its record stands as it ended
            return self.get(job.id)

    def add_event(self, job_id: str, kind: str, message: str = "", **data: Any) -> str:
        entry = {"type": kind, "message": message, "created_at": time.time(), "data": data}
        event_id = self.conn.xadd(
            self.key(job_id) + ":events", {"event": json.dumps(entry)}, maxlen=EVENTS_MAXLEN, approximate=True
        )
        return event_id.decode() if isinstance(event_id, bytes) else event_id

    def events(
        self, job_id: str, *, after: str | None = None, limit: int = 100, block_ms: int | None = None
    ) -> builtins.list[dict[str, Any]]:
        key = self.key(job_id) + ":events"
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
        self.conn.set(self.key(job_id) + ":heartbeat", str(attempt), px=int(ttl_s * 1000))

    def heartbeat(self, job_id: str) -> int | None:
        """The attempt whose process is alive, or None when no heartbeat is live."""
        raw = self.conn.get(self.key(job_id) + ":heartbeat")
        return None if raw is None else int(raw)

    def clear_heartbeat(self, job_id: str) -> None:
        self.conn.delete(self.key(job_id) + ":heartbeat")

    def running_ids(self) -> builtins.list[str]:
        return sorted(i.decode() for i in self.conn.smembers(RUNNING))

    def forget_running(self, job_id: str) -> None:
        self.conn.srem(RUNNING, job_id)

    # --- checkpoints ----------------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, summary: dict[str, Any]) -> None:
        self.conn.hset(self.key(job_id) + ":checkpoints", str(step), json.dumps({"step": step, **summary}))

    def checkpoints(self, job_id: str) -> builtins.list[dict[str, Any]]:
        raw = self.conn.hgetall(self.key(job_id) + ":checkpoints")
        return sorted((json.loads(v) for v in raw.values()), key=lambda c: c["step"])
