"""One job on several machines: ``training.num_nodes = M`` (x ``num_processes`` per node) runs on M fleet workers at
once, as one torch elastic job (worker/distributed.py runs each node's processes).

* **Forming the gang.** The job's own task (``worker.tasks.run_training_job``) is node 0. The worker that takes it
  picks a port (``BONE_RENDEZVOUS_PORT``, else a free one), publishes ``host:port`` (host: ``BONE_NODE_ADDRESS``,
  else this machine's address) and the attempt under ``bone:job:{id}:gang``, enqueues M-1 node tasks
  (``worker.tasks.run_node(job_id, attempt, slot)``) on the job's queue, and starts its elastic agent as the host of
  the c10d rendezvous store (rendezvous id = job id). Each worker that takes a node task reads the endpoint and
  starts its agent there. The rendezvous completes when all M agents have joined (``min_nodes = max_nodes = M``);
  torch then numbers the ranks (global rank 0 may be on any node).
* **A gang that does not assemble** within ``BONE_RENDEZVOUS_TIMEOUT_S`` (too few free workers): every agent gives
  up; node 0 records the reason on the job and stops its heartbeat, so the janitor puts the job back on the queue
  (or fails it after ``BONE_MAX_ATTEMPTS``, with that reason). Node tasks exit quietly. A node task taken after
  its attempt ended (the job re-queued, finished, cancelled) does nothing.
* **A member lost mid-job.** Every node task keeps ``bone:job:{id}:node:{slot}`` alive (a heartbeat). When a node's
  worker dies, the other ranks' collectives fail and their agents restart the group (``BONE_DISTRIBUTED_MAX_RESTARTS``):
  the restarted round again needs M nodes. Node 0 watches its members' heartbeats (``GangKeeper``); a slot whose
  heartbeat expired gets a replacement node task at the front of the queue, and the group that assembles with it
  resumes from the job's newest checkpoint in the registry's store. Losing node 0 (the rendezvous host) ends the
  gang: the other agents fail, their tasks exit, and the janitor re-queues the job (its heartbeat is node 0's),
  which resumes from the same checkpoint on a new gang.
* **Who finishes the job.** The node whose agent holds global rank 0 publishes the adapter and marks the job
  succeeded (rank 0 saved the adapter on that node's disk). Node 0 owns everything else in the record: it started
  the attempt, keeps its heartbeat until the job is final, and records failures and cancellation.

Tested on one machine (tests/e2e/test_nodes.py): two ``bone-server worker`` processes with their own data dirs and
a shared registry, two gloo processes each over 127.0.0.1; the same with one node's worker SIGKILLed mid-job; and
a two-node job with one worker, which goes back to the queue and then fails naming the timeout.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from core.jobstore import JobStore
from core.queueing import enqueue
from core.records import PREFIX
from core.settings import Settings

log = logging.getLogger(__name__)

NODE_TASK = "worker.tasks.run_node"


def gang_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:gang"


def member_key(job_id: str, slot: int) -> str:
    return f"{PREFIX}job:{job_id}:node:{slot}"


class GangNotAssembled(RuntimeError):
    """The job's nodes did not all meet (rendezvous timeout), or the gang fell apart (its host went away)."""


@dataclass(frozen=True)
class Node:
    """This worker's place in a multi-node job: ``index`` 0 hosts the rendezvous store at ``endpoint``."""

    index: int
    count: int
    endpoint: str
    address: str  # this node's own address, which the other nodes reach its ranks at

    @property
    def is_host(self) -> bool:
        return self.index == 0


def node_address(settings: Settings) -> str:
    if settings.node_address:
        return settings.node_address
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# --- node 0 ---------------------------------------------------------------------------------------------------
def open_gang(conn: redis.Redis, settings: Settings, job_id: str, attempt: int, count: int, queue: str | None) -> Node:
    """Publish this worker's rendezvous endpoint for the attempt and queue the other nodes' tasks."""
    address = node_address(settings)
    endpoint = f"{address}:{settings.rendezvous_port or _free_port()}"
    conn.set(
        gang_key(job_id),
        json.dumps({"endpoint": endpoint, "attempt": attempt, "nodes": count}),
        px=int(_gang_ttl_s(settings) * 1000),
    )
    for slot in range(1, count):
        conn.delete(member_key(job_id, slot))
        enqueue_node(conn, settings, job_id, attempt, slot, queue)
    log.info("job %s: node 0 of %d, rendezvous at %s", job_id, count, endpoint)
    return Node(0, count, endpoint, address)


def _gang_ttl_s(settings: Settings) -> float:
    return settings.rendezvous_timeout_s + settings.heartbeat_ttl_s


def enqueue_node(
    conn: redis.Redis,
    settings: Settings,
    job_id: str,
    attempt: int,
    slot: int,
    queue: str | None,
    *,
    at_front: bool = False,
) -> None:
    enqueue(
        conn,
        settings,
        NODE_TASK,
        job_id,
        queue=queue,
        at_front=at_front,
        args=(attempt, slot),
        rq_id=f"{job_id}-a{attempt}-node{slot}-{uuid.uuid4().hex[:8]}",
    )


def close_gang(conn: redis.Redis, job_id: str, count: int) -> None:
    conn.delete(gang_key(job_id), *(member_key(job_id, slot) for slot in range(1, count)))


class GangKeeper:
    """Node 0's thread while the gang trains: keeps the endpoint published and gives a slot whose member died a
    replacement node task (the surviving agents wait for it in their restarted rendezvous)."""

    def __init__(self, settings: Settings, job_id: str, attempt: int, count: int, queue: str | None) -> None:
        self.settings, self.job_id, self.attempt, self.count, self.queue = settings, job_id, attempt, count, queue
        self.conn = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        self.replaced = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gang-{job_id}", daemon=True)

    def __enter__(self) -> GangKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.conn.close()

    def members_alive(self) -> bool:
        return any(self.conn.exists(member_key(self.job_id, slot)) for slot in range(1, self.count))

    def _run(self) -> None:
        seen: set[int] = set()
        while not self._stop.wait(max(0.2, self.settings.heartbeat_ttl_s / 5)):
            try:
                self.conn.pexpire(gang_key(self.job_id), int(_gang_ttl_s(self.settings) * 1000))
                for slot in range(1, self.count):
                    if self.conn.exists(member_key(self.job_id, slot)):
                        seen.add(slot)
                    elif slot in seen:  # it had joined and its heartbeat expired: the member is gone
                        seen.discard(slot)
                        self.replaced += 1
                        log.warning("job %s: node %d stopped; queueing a replacement", self.job_id, slot)
                        JobStore(self.conn).add_event(
                            self.job_id,
                            "message",
                            f"node {slot} of {self.count} was lost; waiting for a replacement worker",
                            node=slot,
                        )
                        enqueue_node(
                            self.conn, self.settings, self.job_id, self.attempt, slot, self.queue, at_front=True
                        )
            except redis.RedisError as exc:
                log.warning("job %s: gang keeper: %s", self.job_id, exc)


def wait_until_final(store: JobStore, keeper: GangKeeper, job_id: str, poll_s: float = 0.5) -> bool:
    """Node 0 when another node holds rank 0: wait (heartbeat on) while that node publishes. False when the job is
    not final and no member is left to finish it (the janitor then re-queues the job)."""
    while True:
        if store.get(job_id).status.is_final:
            return True
        if not keeper.members_alive():
            return store.get(job_id).status.is_final
        time.sleep(poll_s)


# --- nodes 1..M-1 ---------------------------------------------------------------------------------------------
class MemberBeat:
    """A node task's heartbeat: ``bone:job:{id}:node:{slot}`` = its worker's name, refreshed by a thread."""

    def __init__(self, settings: Settings, job_id: str, slot: int, worker: str) -> None:
        self.conn = redis.Redis.from_url(settings.redis_url, socket_timeout=max(1.0, settings.heartbeat_ttl_s / 3))
        self.key, self.worker, self.ttl_ms = member_key(job_id, slot), worker, int(settings.heartbeat_ttl_s * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"node-{job_id}-{slot}", daemon=True)

    def claim(self) -> bool:
        """Take the slot, unless a live member holds it."""
        return bool(self.conn.set(self.key, self.worker, nx=True, px=self.ttl_ms))

    def __enter__(self) -> MemberBeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            if self.conn.get(self.key) == self.worker.encode():
                self.conn.delete(self.key)
        except redis.RedisError:
            pass  # it expires by itself
        self.conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_ms / 5000):
            try:
                self.conn.set(self.key, self.worker, px=self.ttl_ms)
            except redis.RedisError as exc:
                log.warning("node heartbeat failed: %s", exc)


def joinable(conn: redis.Redis, store: JobStore, job_id: str, attempt: int) -> dict | None:
    """The gang to join, or None when the attempt this node task was queued for is over."""
    from core.jobs import JobStatus

    job = store.get(job_id)
    if job.status is not JobStatus.RUNNING or job.attempts != attempt or store.cancel_requested(job_id):
        return None
    raw = conn.get(gang_key(job_id))
    gang = json.loads(raw) if raw else None
    return gang if gang and gang["attempt"] == attempt else None
