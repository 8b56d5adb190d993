"""The liveness signal of a running job: a thread in the process that trains it refreshes
``bone:job:{id}:heartbeat`` (value: the attempt number) every ``ttl/5`` seconds. A thread, not the training
loop, so a long step (or a long evaluation, or a slow checkpoint write) never looks like death; if the
whole process dies, the key expires after ``ttl`` and the janitor (core/janitor.py) re-queues the job."""

from __future__ import annotations

import logging
import threading

import redis

from core.jobstore import JobStore

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, redis_url: str, job_id: str, attempt: int, ttl_s: float) -> None:
        self.store = JobStore(redis.Redis.from_url(redis_url, socket_timeout=max(1.0, ttl_s / 3)))
        self.job_id, self.attempt, self.ttl_s = job_id, attempt, ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.store.beat(self.job_id, self.attempt, self.ttl_s)  # at once: the janitor must never see a gap
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.store.clear_heartbeat(self.job_id)
        except redis.RedisError:
            pass  # it expires by itself
        self.store.conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 5):
            try:
                self.store.beat(self.job_id, self.attempt, self.ttl_s)
            except redis.RedisError as exc:  # Redis blips: keep trying; a long outage is a real loss of contact
                log.warning("job %s: heartbeat failed: %s", self.job_id, exc)
