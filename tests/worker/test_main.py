"""The real forking worker: preload in the parent, one forked work-horse per job."""

import os
import signal

import torch
from rq import Queue
from rq.exceptions import AbandonedJobError
from rq.job import Job as RQJob

from core.jobs import JobStatus
from core.registry import AdapterRegistry
from worker import main, model_cache

TASK = "worker.tasks.run_training_job"


def die_by_sigkill(job_id: str) -> None:
    """A task whose work-horse is killed, as the OOM killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_the_forking_worker_runs_a_job_on_the_preloaded_model(task_settings, redis_conn, store, make_job,
                                                               monkeypatch):
    settings = task_settings
    model_cache.preload(settings.base_model, settings, torch.device("cpu"))

    def no_reload(*args, **kwargs):
        raise AssertionError("the work-horse read the base model from disk again")

    monkeypatch.setattr(model_cache, "load_base_model", no_reload)  # the forked work-horse inherits this
    job = make_job([{"text": "abc"}, {"text": "abd"}], adapter_name="forked", max_steps=3)
    Queue(settings.queue_name, connection=redis_conn).enqueue(TASK, job.id, job_id=job.id,
                                                              job_timeout=settings.job_timeout_s)
    main.run_worker(settings, burst=True)

    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert AdapterRegistry(settings.registry_dir).exists("forked")


def test_a_killed_work_horse_fails_the_job_with_a_reason(task_settings, redis_conn, store, make_job):
    settings = task_settings
    job = make_job([{"text": "abc"}], adapter_name="killed")
    # Marked running as our task would have done before dying.
    store.transition(job.id, None, status=JobStatus.RUNNING)
    Queue(settings.queue_name, connection=redis_conn).enqueue(f"{__name__}.die_by_sigkill", job.id, job_id=job.id)
    main.run_worker(settings, burst=True)

    done = store.get(job.id)
    assert done.status is JobStatus.FAILED
    assert done.error == "the training process died: killed by signal 9 (out of memory?)"


def test_an_abandoned_job_is_failed_by_the_maintenance_handler(redis_conn, store, make_job):
    job = make_job([{"text": "abc"}])
    store.transition(job.id, None, status=JobStatus.RUNNING)
    rq_job = RQJob.create(TASK, args=(job.id,), id=job.id, connection=redis_conn)
    assert main._abandoned_job_handler(rq_job, AbandonedJobError, AbandonedJobError(), None) is True
    done = store.get(job.id)
    assert done.status is JobStatus.FAILED and "stopped responding" in done.error


def test_maintenance_runs_often_enough_to_notice_a_dead_worker(settings):
    assert main.maintenance_interval(settings) == 10  # worker TTL 30 s: ~90 s to notice (rq-redis-notes.md)
