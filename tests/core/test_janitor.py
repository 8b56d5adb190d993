"""The janitor on the real Redis: which running jobs it judges dead, and what it does with them."""

import threading
import time

import pytest
from rq import Queue

from core import janitor
from core.jobs import BoneSpec, Job, JobStatus, TrainingSpec
from core.jobstore import JobStore


@pytest.fixture
def store(redis_conn):
    return JobStore(redis_conn)


def running_job(store, *, attempts=1, started_ago=60.0, beat=False) -> Job:
    job = Job(
        id=Job.new_id(),
        adapter_name="a",
        base_model="embedded",
        dataset={"records": 1},
        bone=BoneSpec(),
        training=TrainingSpec(),
    )
    store.create(job, records=[{"text": "x"}])
    store.transition(job.id, None, status=JobStatus.RUNNING, attempts=attempts, started_at=time.time() - started_ago)
    if beat:
        store.beat(job.id, attempts, ttl_s=30)
    return job


def test_only_running_jobs_without_a_heartbeat_are_requeued(redis_conn, settings, store):
    dead = running_job(store)
    alive = running_job(store, beat=True)
    just_started = running_job(store, started_ago=1.0)
    job = Job(
        id=Job.new_id(),
        adapter_name="b",
        base_model="embedded",
        dataset={"records": 1},
        bone=BoneSpec(),
        training=TrainingSpec(),
    )
    store.create(job)
    store.transition(job.id, None, status=JobStatus.RUNNING)  # never started by a worker (no started_at)

    assert janitor.sweep(redis_conn, settings) == [dead.id]
    assert store.get(dead.id).status is JobStatus.QUEUED and store.get(dead.id).attempts == 1
    assert [store.get(j.id).status for j in (alive, just_started, job)] == [JobStatus.RUNNING] * 3
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [dead.id]
    retry = store.events(dead.id)[-1]
    assert retry["type"] == "retry" and "attempt 2 of 3" in retry["message"]
    assert dead.id not in store.running_ids() and alive.id in store.running_ids()


def test_the_last_attempt_fails_with_the_reason(redis_conn, settings, store):
    job = running_job(store, attempts=settings.max_attempts)
    assert janitor.sweep(redis_conn, settings) == [job.id]
    done = store.get(job.id)
    assert done.status is JobStatus.FAILED and done.finished_at is not None
    assert done.error == (
        "the worker running attempt 3 stopped (no heartbeat for 15 s); gave up after 3 attempts (BONE_MAX_ATTEMPTS)"
    )
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == []


def test_a_later_attempt_is_never_requeued_for_an_earlier_ones_death(redis_conn, settings, store):
    job = running_job(store, attempts=2)
    assert janitor.recover(redis_conn, settings, job.id, 1, "attempt 1 died") is None
    assert store.get(job.id).status is JobStatus.RUNNING


def test_concurrent_janitors_requeue_a_job_once(redis_conn, settings, store):
    job = running_job(store)
    results = []
    threads = [threading.Thread(target=lambda: results.extend(janitor.sweep(redis_conn, settings))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [job.id]
    assert Queue(settings.queue_name, connection=redis_conn).job_ids == [job.id]
    assert [e["type"] for e in store.events(job.id)].count("retry") == 1


def test_the_janitor_thread_acts_within_an_interval(redis_conn, settings, store):
    fast = settings.model_copy(update={"janitor_interval_s": 0.1})
    job = running_job(store)
    worker = janitor.Janitor(fast).start()
    try:
        deadline = time.monotonic() + 5
        while store.get(job.id).status is JobStatus.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert store.get(job.id).status is JobStatus.QUEUED


def test_work_dirs_of_final_jobs_are_swept(redis_conn, settings, store):
    job = running_job(store)
    keep = settings.jobs_dir / job.id
    gone = settings.jobs_dir / "job-unknown"
    other = settings.jobs_dir / "datasets-cache"
    for folder in (keep, gone, other):
        folder.mkdir(parents=True)
    assert janitor.sweep_workdirs(store, settings, min_age_s=0) == 1
    assert keep.exists() and not gone.exists() and other.exists()
    store.update(job.id, status=JobStatus.CANCELLED)
    assert janitor.sweep_workdirs(store, settings, min_age_s=0) == 1 and not keep.exists()
