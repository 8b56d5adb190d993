"""Queued jobs a worker takes off an RQ queue itself (co-training, worker/cotrain_claims.py) rather than being
handed them by RQ: the claim, its release, and the janitor's recovery of claims whose claimer died.

A claim is one Lua script, so it happens whole or not at all:
  * LREM the job's id from its RQ queue list: 1 = this claimer's; 0 = an RQ worker or another claimer took it
  * note it in ``cotrain:claims`` (sorted set id -> claim time) and its claimer in ``cotrain:claimers``
    (hash id -> the id of a running job whose heartbeat vouches for the claiming process)
  * delete RQ's own job hash: an RQ worker that meets the id anyway skips it (RQ's dequeue passes over ids
    without a hash), and RQ has no record left to report as abandoned or failed. The queued job has no RQ
    registry entry (RQ adds one only when a worker starts it), so nothing else of RQ's remains.

The claimer then starts the job (worker.tasks._start: queued -> running, attempt + 1, its own heartbeat) and
releases the claim (``release``); from then on it is an ordinary running job, which the janitor re-queues
when its heartbeat goes (core/janitor.py).

The window: between the claim and the start the job is ``queued`` yet on no RQ queue. A claimer dying there
would lose it, so the janitor's ``sweep_claims`` puts such a job back at the front of its queue once the claim
is older than ``heartbeat_ttl_s`` *and* the claimer's heartbeat is gone; a claim whose job is running or final
already is just dropped. While the claimer's heartbeat lives its claims are left alone (it is slow, not dead):
a job is never put back while a live claimer may still start it. What remains: a claimer that stalls longer
than the TTL while its vouching job has ended and then starts the job after the janitor put it back; RQ's
worker then finds it running with a live heartbeat and does not run it twice (``_start``), unless it reads the
record in the moment between the claimer's status change and its first beat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis
from rq import Queue
from rq.job import Job as RQJob

from core.errors import NotFound, ServiceError
from core.jobs import JobStatus
from core.jobstore import JobStore
from core.queueing import TRAINING_TASK, enqueue
from core.records import PREFIX
from core.settings import Settings

log = logging.getLogger(__name__)

CLAIMS = PREFIX + "cotrain:claims"  # sorted set: claimed job id -> claim time
CLAIMERS = PREFIX + "cotrain:claimers"  # hash: claimed job id -> the running job vouching for its claimer

# KEYS: RQ queue list, CLAIMS, CLAIMERS, RQ job hash; ARGV: job id, now, claimer
_CLAIM = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  redis.call('DEL', KEYS[4])
  return 1
end
return 0
"""


def queue_key(queue_name: str) -> str:
    """The Redis list RQ keeps a queue's waiting job ids in (``rq:queue:<name>``)."""
    return Queue.redis_queue_namespace_prefix + queue_name


def claim(conn: redis.Redis, queue_name: str, job_id: str, claimer: str, *, now: float | None = None) -> bool:
    """Take ``job_id`` off RQ queue ``queue_name`` for the process vouched for by running job ``claimer``'s
    heartbeat. True when it is this caller's (no RQ worker or other claimer will run it)."""
    rq_key = RQJob.key_for(job_id)
    keys = [queue_key(queue_name), CLAIMS, CLAIMERS, rq_key.decode() if isinstance(rq_key, bytes) else rq_key]
    taken = conn.eval(_CLAIM, len(keys), *keys, job_id, time.time() if now is None else now, claimer)
    return bool(taken)


def release(conn: redis.Redis, job_ids: Iterable[str]) -> None:
    """The claimer started these jobs (or they ended): the claims are done with."""
    ids = list(job_ids)
    if ids:
        with conn.pipeline(transaction=True) as pipe:
            pipe.zrem(CLAIMS, *ids)
            pipe.hdel(CLAIMERS, *ids)
            pipe.execute()


def claimed_ids(conn: redis.Redis) -> list[str]:
    return [i.decode() for i in conn.zrange(CLAIMS, 0, -1)]


def put_back(conn: redis.Redis, settings: Settings, job_id: str, reason: str) -> bool:
    """Return a claimed job to the front of its queue if it is still queued (WATCHed: a claimer starting it
    meanwhile wins); drop the claim in any case. True when it was re-queued."""
    store = JobStore(conn)
    key = store.key(job_id)
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key, CLAIMS)
                if pipe.zscore(CLAIMS, job_id) is None:
                    return False  # released or put back by someone else
                try:
                    job = store.get(job_id)
                except (NotFound, ServiceError):
                    job = None
                pipe.multi()
                pipe.zrem(CLAIMS, job_id)
                pipe.hdel(CLAIMERS, job_id)
                requeue = job is not None and job.status is JobStatus.QUEUED
                if requeue and job is not None:
                    # At the front: it had been at the head of the queue already when it was claimed.
                    enqueue(conn, settings, TRAINING_TASK, job_id, queue=job.queue, at_front=True, pipeline=pipe)
                pipe.execute()
                break
            except redis.WatchError:
                continue
    if requeue:
        store.add_event(job_id, "message", f"{reason}; queued again")
        log.warning("job %s: %s; queued again", job_id, reason)
    return requeue


def sweep_claims(conn: redis.Redis, settings: Settings, *, now: float | None = None) -> list[str]:
    """The janitor's pass over the claims: those older than one heartbeat TTL whose claimer's heartbeat is gone
    go back to their queue (still queued) or are dropped (started or final meanwhile). Returns the re-queued ids."""
    store = JobStore(conn)
    now = time.time() if now is None else now
    requeued = []
    # Newest first: each goes to the front of its queue, so jobs claimed together keep their order.
    for raw_id in conn.zrevrangebyscore(CLAIMS, now - settings.heartbeat_ttl_s, "-inf"):
        job_id = raw_id.decode()
        claimer = conn.hget(CLAIMERS, job_id)
        if claimer is not None and store.heartbeat(claimer.decode()) is not None:
            continue  # the claimer lives: starting (or returning) the job is its business
        if put_back(conn, settings, job_id, "the worker that claimed it for co-training stopped before starting it"):
            requeued.append(job_id)
    return requeued
