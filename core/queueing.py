"""Putting work on the RQ queues, the one way every caller does it (the API's POST /jobs and /evals, the
janitor's re-queue).

Tasks are enqueued by dotted path, so the API never imports ``worker``. The RQ job takes the record's id
(cancel finds it by that id) and an explicit timeout: RQ's default of 180 s would kill training.
"""

from __future__ import annotations

from typing import Any

import redis
from rq import Queue

from core.settings import Settings

TRAINING_TASK = "worker.tasks.run_training_job"
EVAL_TASK = "worker.evals.run_eval_job"
RESULT_TTL_S = 86400  # how long RQ keeps a finished job's result
FAILURE_TTL_S = 7 * 86400  # ... and a failed one's, for its traceback


def enqueue(
    conn: redis.Redis,
    settings: Settings,
    task: str,
    record_id: str,
    *,
    queue: str | None = None,
    at_front: bool = False,
    pipeline: Any = None,
    args: tuple[Any, ...] = (),
    rq_id: str | None = None,
) -> None:
    """Queue ``task(record_id, *args)`` on ``queue`` (default: the training queue). With ``pipeline`` the entry
    joins the caller's MULTI/EXEC. ``rq_id``: the RQ job's id when it is not the record's (a record's second task,
    e.g. a multi-node job's node tasks)."""
    Queue(queue or settings.queue_name, connection=conn).enqueue(
        task,
        record_id,
        *args,
        job_id=rq_id or record_id,
        job_timeout=settings.job_timeout_s,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        at_front=at_front,
        pipeline=pipeline,
    )
