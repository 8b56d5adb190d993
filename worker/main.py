"""The worker process: a forking RQ ``Worker`` on the training queue, with the base model preloaded.

``bone-server worker`` calls ``run_worker(get_settings())``. The parent process loads the base model once
(on the CPU) and then forks one work-horse per job; every work-horse inherits the model without reading it
from disk again (see ``worker.model_cache`` for why, and for the CUDA-and-fork rule).

Dead work is noticed quickly, so no job stays ``running`` forever:
* a work-horse that dies (OOM killer, segfault) is reported by RQ at once -> the job is marked failed;
* a whole worker that dies stops heart-beating; another worker's maintenance pass (every
  ``maintenance_interval`` s) finds its job abandoned once the registry entry expires (about 3x the worker
  TTL) -> the job is marked failed. Measured in shared/reference/rq-redis-notes.md: ~90 s with TTL 30 and
  maintenance 10, versus ~810 s with RQ's defaults.
"""

from __future__ import annotations

import logging
import os

from core.settings import Settings

log = logging.getLogger(__name__)


def maintenance_interval(settings: Settings) -> int:
    return max(5, settings.worker_ttl_s // 3)


def run_worker(settings: Settings, *, burst: bool = False) -> bool:
    """Serve the training queue until stopped (or, with ``burst``, until it is empty). Returns RQ's result."""
    # Before anything imports torch.cuda: ask NVML whether a GPU exists, which does not initialise CUDA in
    # this (parent) process; the work-horses forked from it can then still use CUDA.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

    import redis
    from rq import Queue, Worker

    from core.base_model import pick_device
    from worker import model_cache, tasks

    tasks.use_settings(settings)  # forked work-horses inherit it, so API flags and tests reach the task
    device = pick_device(settings)
    log.info("preloading base model %r (jobs will train on %s)", settings.base_model, device.type)
    model_cache.preload(settings.base_model, settings, device)

    conn = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=conn)
    worker = Worker(
        [queue], connection=conn,
        worker_ttl=settings.worker_ttl_s,
        maintenance_interval=maintenance_interval(settings),
        exception_handlers=[_abandoned_job_handler],
        work_horse_killed_handler=_work_horse_killed,
    )
    log.info("worker %s listening on queue %r at %s (worker TTL %d s, maintenance every %d s)", worker.name,
             settings.queue_name, settings.redis_url, settings.worker_ttl_s, maintenance_interval(settings))
    return worker.work(burst=burst, with_scheduler=False, logging_level=settings.log_level.upper())


def _work_horse_killed(job, pid: int, status: int, rusage) -> None:
    """RQ's hook for a work-horse that exited without finishing its job (killed by a signal, usually OOM)."""
    from worker.tasks import mark_failed

    signal_no = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    cause = f"killed by signal {signal_no}" + (" (out of memory?)" if signal_no == 9 else "") if signal_no else \
        f"exited with status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}"
    log.error("work-horse %d of job %s %s", pid, job.id, cause)
    mark_failed(job.connection, job.id, f"the training process died: {cause}")


def _abandoned_job_handler(job, exc_type, exc_value, traceback) -> bool:
    """RQ calls worker exception handlers from registry maintenance with ``AbandonedJobError`` for a job whose
    worker stopped heart-beating (killed, machine lost). Other exceptions never reach here from our task,
    which records its own failures."""
    from rq.exceptions import AbandonedJobError

    from worker.tasks import mark_failed

    if exc_type is AbandonedJobError or isinstance(exc_value, AbandonedJobError):
        log.error("job %s was abandoned by its worker", job.id)
        mark_failed(job.connection, job.id, "the worker running this job stopped responding (killed or lost)")
    return True  # let RQ's own handling continue
