"""The real forking worker: preload in the parent, one forked work-horse per job."""

import os
import signal
import time

import pytest
import torch
from rq import Queue
from rq.exceptions import AbandonedJobError
from rq.job import Job as RQJob

from core import janitor
from core.jobs import JobStatus
from core.registry import AdapterRegistry
from worker import main, model_cache

TASK = "worker.tasks.run_training_job"


def die_by_sigkill(job_id: str) -> None:
    """A task whose work-horse is killed, as the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_forking_worker_runs_a_job_on_the_preloaded_model(task_settings, redis_conn, store, make_job, monkeypatch):
    settings = task_settings
    model_cache.preload(settings.base_model, settings, torch.device("cpu"))

    def no_reload(*args, **kwargs):
        raise AssertionError("the work-horse read the base model from disk again")

    monkeypatch.setattr(model_cache, "load_base_model", no_reload)  # the forked work-horse inherits this
    job = make_job([{"text": "abc"}, {"text": "abd"}], adapter_name="forked", max_steps=3)
    Queue(settings.queue_name, connection=redis_conn).enqueue(
        TASK, job.id, job_id=job.id, job_timeout=settings.job_timeout_s
    )
    main.run_worker(settings, burst=True)

    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert AdapterRegistry(settings.registry_dir).exists("forked")


@pytest.mark.parametrize("max_attempts, status", [(2, JobStatus.QUEUED), (1, JobStatus.FAILED)])
def test_a_killed_work_horse_is_retried_naming_the_cause(
    task_settings, redis_conn, store, make_job, max_attempts, status
):
    settings = task_settings.model_copy(update={"max_attempts": max_attempts})
    job = make_job([{"text": "abc"}], adapter_name="killed")
    # Marked running (attempt 1, heart-beating) as our task would have done before dying.
    store.transition(job.id, None, status=JobStatus.RUNNING, started_at=time.time(), attempts=1)
    store.beat(job.id, 1, ttl_s=60)
    Queue(settings.queue_name, connection=redis_conn).enqueue(f"{__name__}.die_by_sigkill", job.id, job_id=job.id)
    main.run_worker(settings, burst=True)

    cause = "the training process died: killed by signal 9 (out of memory?)"
    dying = store.get(job.id)
    assert dying.status is JobStatus.RUNNING and dying.error == cause  # recorded, left to the janitor
    assert store.heartbeat(job.id) is None  # dropped at once: no need to wait for the TTL

    assert janitor.sweep(redis_conn, settings, now=time.time() + settings.heartbeat_ttl_s) == [job.id]
    done = store.get(job.id)
    assert done.status is status
    if status is JobStatus.QUEUED:
        assert done.error is None and Queue(settings.queue_name, connection=redis_conn).job_ids == [job.id]
        retry = store.events(job.id)[-1]
        assert retry["type"] == "retry" and retry["message"].startswith(cause)
    else:
        assert done.error == f"{cause}; gave up after 1 attempts (BONE_MAX_ATTEMPTS)"


def test_rq_abandoned_reports_leave_the_job_to_the_janitor(redis_conn, store, make_job):
    """RQ reports an abandoned job 90+ s late, when it may be running again elsewhere: it must not fail it."""
    job = make_job([{"text": "abc"}])
    store.transition(job.id, None, status=JobStatus.RUNNING, started_at=time.time(), attempts=2)
    rq_job = RQJob.create(TASK, args=(job.id,), id=job.id, connection=redis_conn)
    assert main._abandoned_job_handler(rq_job, AbandonedJobError, AbandonedJobError(), None) is True
    assert store.get(job.id).status is JobStatus.RUNNING


def test_maintenance_runs_often_enough_to_notice_a_dead_worker(settings):
    assert main.maintenance_interval(settings) == 10  # worker TTL 30 s: ~90 s to notice (rq-redis-notes.md)


def test_rq_maintenance_lines_show_at_debug_only(caplog):
    import logging

    from worker.main import MaintenanceAtDebug

    rq_log = logging.getLogger("rq.worker.test-maintenance")
    rq_log.addFilter(MaintenanceAtDebug())
    with caplog.at_level(logging.INFO, logger=rq_log.name):
        rq_log.info("Worker %s: cleaning registries for queue: %s", "w1", "bone-training")
        rq_log.info("Worker %s: started with PID %d", "w1", 1)  # other lines stay as they are
    assert [r.getMessage() for r in caplog.records] == ["Worker w1: started with PID 1"]
    with caplog.at_level(logging.DEBUG, logger=rq_log.name):
        rq_log.info("Worker %s: cleaning registries for queue: %s", "w1", "bone-training")
    assert caplog.records[-1].levelname == "DEBUG" and "cleaning registries" in caplog.records[-1].getMessage()
