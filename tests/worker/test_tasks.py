"""The RQ task end to end: jobs enqueued by dotted path on the real Redis, run by RQ's SimpleWorker."""

import threading
import time

import pytest
import torch
from rq import Queue, SimpleWorker

from bone.layer import BoneLinear
from core.jobs import JobStatus
from core.registry import WEIGHTS_FILE, AdapterRegistry, file_sha256
from worker import model_cache
from worker.tasks import describe_failure

TASK = "worker.tasks.run_training_job"  # what the API enqueues
LEARNABLE = [{"prompt": f"{w}?", "completion": w.upper()} for w in ("ab", "cd", "ef", "gh")]


def run_queued(redis_conn, settings, *job_ids):
    queue = Queue(settings.queue_name, connection=redis_conn)
    for job_id in job_ids:
        queue.enqueue(TASK, job_id, job_id=job_id, job_timeout=settings.job_timeout_s)
    SimpleWorker([queue], connection=redis_conn).work(burst=True)


def step_events(store, job_id):
    return [e for e in store.events(job_id, limit=1000) if e["type"] == "step"]


def test_a_job_trains_and_publishes_its_adapter(task_settings, redis_conn, store, make_job):
    job = make_job(LEARNABLE, adapter_name="letters", max_steps=12, learning_rate=1e-2, batch_size=4)
    run_queued(redis_conn, task_settings, job.id)

    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.error is None and done.attempts == 1 and done.started_at <= done.finished_at
    assert (done.progress.step, done.progress.total_steps) == (12, 12)
    assert done.metrics["train_loss"] < done.metrics["train_loss_first"]  # it learned

    registry = AdapterRegistry(task_settings.registry_dir)
    info = registry.get("letters")
    assert info.sha256 == file_sha256(registry.path("letters") / WEIGHTS_FILE)
    assert (info.job_id, info.base_model, info.bone["r"]) == (job.id, "embedded", 8)
    assert info.metrics["train_loss"] == done.metrics["train_loss"]
    config = registry.adapter_config("letters")
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == ("BONE", "CAUSAL_LM", "embedded")

    steps = step_events(store, job.id)
    assert [e["data"]["step"] for e in steps] == list(range(1, 13))
    assert set(steps[-1]["data"]) >= {"loss", "lr", "grad_norm", "tokens_per_s", "total_steps"}
    assert not (task_settings.jobs_dir / job.id).exists()  # temp files gone


def test_a_second_job_reuses_the_cached_base_model_untouched(task_settings, redis_conn, store, make_job):
    first = make_job(LEARNABLE, adapter_name="one", max_steps=2)
    run_queued(redis_conn, task_settings, first.id)
    loads = model_cache.loads
    cached = model_cache.preload("embedded", task_settings, torch.device("cpu"))
    before = {k: v.clone() for k, v in cached.model.state_dict().items()}

    second = make_job(LEARNABLE, adapter_name="two", max_steps=2, bone={"bias": "all"})  # trains base biases
    run_queued(redis_conn, task_settings, second.id)
    assert store.get(second.id).status is JobStatus.SUCCEEDED
    assert model_cache.loads == loads  # not read from disk again
    assert not any(isinstance(m, BoneLinear) for m in cached.model.modules())  # the job wrapped its own copy
    after = cached.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_bad_row_fails_the_job_naming_the_row(task_settings, redis_conn, store, make_job):
    job = make_job([{"text": "fine"}, {"prompt": "no completion"}], adapter_name="bad")
    run_queued(redis_conn, task_settings, job.id)
    done = store.get(job.id)
    assert done.status is JobStatus.FAILED
    assert done.error.startswith("dataset row 1: missing field 'completion'")
    assert not AdapterRegistry(task_settings.registry_dir).exists("bad")
    assert store.events(job.id)[-1]["data"]["status"] == "failed"


def test_an_existing_adapter_is_not_overwritten_unless_asked(task_settings, redis_conn, store, make_job):
    first = make_job(LEARNABLE, adapter_name="taken", max_steps=1)
    second = make_job(LEARNABLE, adapter_name="taken", max_steps=1)
    third = make_job(LEARNABLE, adapter_name="taken", max_steps=1, overwrite=True)
    run_queued(redis_conn, task_settings, first.id, second.id, third.id)
    assert [store.get(j.id).status for j in (first, second, third)] == [
        JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUCCEEDED]
    assert "already exists" in store.get(second.id).error
    assert AdapterRegistry(task_settings.registry_dir).get("taken").job_id == third.id


def test_a_job_cancelled_before_it_starts_never_runs(task_settings, redis_conn, store, make_job):
    # The API sets the flag first; a worker that dequeues the job before the API marks it cancelled
    # must still not run it.
    job = make_job(LEARNABLE, adapter_name="never")
    store.request_cancel(job.id)
    run_queued(redis_conn, task_settings, job.id)
    done = store.get(job.id)
    assert done.status is JobStatus.CANCELLED and done.started_at is None and done.attempts == 0
    assert step_events(store, job.id) == []
    assert not AdapterRegistry(task_settings.registry_dir).exists("never")


def test_a_running_job_stops_at_the_next_step_when_cancelled(task_settings, redis_conn, store, make_job):
    job = make_job(LEARNABLE, adapter_name="stopped", max_steps=2000)

    def cancel_after_two_steps():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(step_events(store, job.id)) < 2:
            time.sleep(0.02)
        store.request_cancel(job.id)

    canceller = threading.Thread(target=cancel_after_two_steps)
    canceller.start()
    run_queued(redis_conn, task_settings, job.id)
    canceller.join()

    done = store.get(job.id)
    assert done.status is JobStatus.CANCELLED and done.error is None
    assert 2 <= len(step_events(store, job.id)) < 2000
    assert not AdapterRegistry(task_settings.registry_dir).exists("stopped")
    assert not (task_settings.jobs_dir / job.id).exists()


@pytest.mark.parametrize("exc, expected", [
    (ValueError("boom\nsecond line"), "ValueError: boom second line"),
    (RuntimeError("x" * 2000), "RuntimeError: " + "x" * 485 + "…"),
])
def test_failures_are_one_line(exc, expected):
    assert describe_failure(exc) == expected
