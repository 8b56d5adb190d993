"""Co-training in the RQ task (worker/cotrain_task.py), on the real Redis and a real RQ worker: the job RQ hands
out claims the other queued jobs, trains them in one group, and records and publishes each on its own."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from rq import Queue, SimpleWorker
from rq.registry import FinishedJobRegistry
from safetensors.torch import load_file

from core.jobs import JobStatus
from core.registry import WEIGHTS_FILE, AdapterRegistry
from worker import context

TASK = "worker.tasks.run_training_job"


def rows(k: int) -> list[dict[str, str]]:
    return [{"prompt": f"q{k}{i}?", "completion": f"a{k}{i}" * (1 + i % 2)} for i in range(6)]


JOBS = [  # (bone, training): Bone and Bat, different r, lengths, batch sizes, learning rates
    ({"r": 8}, dict(max_steps=6, batch_size=2, learning_rate=1e-3, seed=1)),
    ({"r": 4, "init_weights": "bat"}, dict(max_steps=4, batch_size=3, learning_rate=2e-3, seed=2)),
    ({"r": 16}, dict(max_steps=8, batch_size=1, gradient_accumulation_steps=2, learning_rate=1e-3, seed=3)),
    ({"r": 8}, dict(max_steps=5, batch_size=2, learning_rate=3e-3, lr_scheduler="cosine", seed=4)),
]


def run_queue(redis_conn, settings, job_ids) -> int:
    """Queue the jobs, run a burst worker; returns how many RQ jobs it ran."""
    queue = Queue(settings.queue_name, connection=redis_conn)
    for job_id in job_ids:
        queue.enqueue(TASK, job_id, job_id=job_id, job_timeout=settings.job_timeout_s)
    SimpleWorker([queue], connection=redis_conn).work(burst=True)
    return len(set(job_ids) & set(FinishedJobRegistry(queue=queue).get_job_ids()))


@pytest.fixture
def cotrain_settings(settings):
    def use(max_jobs: int):
        context.use_settings(settings.model_copy(update={"cotrain_max_jobs": max_jobs}))
        return context.current_settings()

    yield use
    context.use_settings(None)


def adapter(settings, name: str) -> dict[str, torch.Tensor]:
    return load_file(AdapterRegistry(settings.registry_dir).path(name) / WEIGHTS_FILE)


def test_queued_jobs_train_in_one_group_each_as_alone(cotrain_settings, redis_conn, store, make_job):
    settings = cotrain_settings(1)  # first each alone: the reference
    alone = [make_job(rows(k), adapter_name=f"alone-{k}", bone=b, **t) for k, (b, t) in enumerate(JOBS)]
    assert run_queue(redis_conn, settings, [j.id for j in alone]) == 4

    settings = cotrain_settings(8)
    group = [make_job(rows(k), adapter_name=f"group-{k}", bone=b, **t) for k, (b, t) in enumerate(JOBS)]
    ran = run_queue(redis_conn, settings, [j.id for j in group])
    assert ran == 1  # the first one led; the other three were claimed off the queue and trained with it
    ids = {j.id for j in group}
    for k, job in enumerate(group):
        done = store.get(job.id)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.attempts == 1 and done.progress.step == JOBS[k][1]["max_steps"]
        assert sorted(done.co_trained_with) == sorted(ids - {job.id})
        steps = [e["data"] for e in store.events(job.id, limit=1000) if e["type"] == "step"]
        assert [s["step"] for s in steps] == list(range(1, JOBS[k][1]["max_steps"] + 1))
        assert all(s["share_s"] > 0 and 0 < s["rows"] <= s["group_rows"] for s in steps)
        assert 0 < done.metrics["cotrain_share_s"] <= done.metrics["train_runtime_s"]
        assert done.metrics["cotrain_steps"] >= 1
        got, want = adapter(settings, f"group-{k}"), adapter(settings, f"alone-{k}")
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
        assert not (settings.jobs_dir / job.id).exists()


def test_a_companion_that_cannot_prepare_fails_alone(cotrain_settings, redis_conn, store, make_job):
    settings = cotrain_settings(8)
    good = make_job(rows(0), adapter_name="good", max_steps=4, batch_size=2)
    bad = make_job([{"txt": "typo"}, {"txt": "again"}], adapter_name="bad", max_steps=4)
    also = make_job(rows(1), adapter_name="also-good", max_steps=3, batch_size=2)
    assert run_queue(redis_conn, settings, [good.id, bad.id, also.id]) == 1
    assert store.get(bad.id).status is JobStatus.FAILED
    assert store.get(good.id).status is JobStatus.SUCCEEDED
    assert store.get(also.id).status is JobStatus.SUCCEEDED
    assert store.get(also.id).co_trained_with == [good.id]


def test_a_companion_cancelled_mid_run_is_recorded_cancelled_and_the_others_go_on(
    cotrain_settings, redis_conn, store, make_job
):
    settings = cotrain_settings(8)
    leader = make_job(rows(0), adapter_name="lead", max_steps=30, batch_size=2)
    other = make_job(rows(1), adapter_name="other", max_steps=200, batch_size=2)
    third = make_job(rows(2), adapter_name="third", max_steps=20, batch_size=2)

    def cancel_at_step_3():
        deadline = time.monotonic() + 120
        while store.get(other.id).progress.step < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        store.request_cancel(other.id)

    thread = threading.Thread(target=cancel_at_step_3)
    thread.start()
    try:
        assert run_queue(redis_conn, settings, [leader.id, other.id, third.id]) == 1
    finally:
        thread.join()
    cancelled = store.get(other.id)
    assert cancelled.status is JobStatus.CANCELLED and 3 <= cancelled.progress.step < 200
    assert store.get(leader.id).status is JobStatus.SUCCEEDED
    assert store.get(third.id).status is JobStatus.SUCCEEDED
    assert not AdapterRegistry(settings.registry_dir).path("other").exists()


def test_a_failed_shared_step_sends_every_member_back_to_train_alone(
    cotrain_settings, redis_conn, store, make_job, monkeypatch
):
    """A group's shared forward failing (an out-of-memory step, say) is no member's own failure: none is failed,
    each goes back to the queue (the janitor re-queues it once its heartbeat is gone) and trains alone, ending
    equal to a run that was never grouped."""
    from core import janitor
    from worker import cotrain

    settings = cotrain_settings(1)
    alone = [make_job(rows(k), adapter_name=f"solo-{k}", bone=b, **t) for k, (b, t) in enumerate(JOBS[:3])]
    assert run_queue(redis_conn, settings, [j.id for j in alone]) == 3

    settings = cotrain_settings(8)
    real_routing, calls = cotrain.routing_context, []

    def failing_third_step(names):
        calls.append(names)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("injected: the group's step did not fit")
        return real_routing(names)

    monkeypatch.setattr(cotrain, "routing_context", failing_third_step)
    group = [make_job(rows(k), adapter_name=f"regrouped-{k}", bone=b, **t) for k, (b, t) in enumerate(JOBS[:3])]
    assert run_queue(redis_conn, settings, [j.id for j in group]) == 1  # the leader ran; the others were claimed
    assert len(set(calls[2])) == 3  # the failing step was the whole group's
    for job in group:
        held = store.get(job.id)
        assert held.status is JobStatus.RUNNING and held.train_alone, held
        assert "shared step of a co-training group of 3 jobs failed" in (held.error or "")

    monkeypatch.setattr(cotrain, "routing_context", real_routing)
    later = time.time() + settings.heartbeat_ttl_s + 1  # heartbeats are gone: the janitor judges them dead
    assert sorted(janitor.sweep(redis_conn, settings, now=later)) == sorted(j.id for j in group)
    SimpleWorker([Queue(settings.queue_name, connection=redis_conn)], connection=redis_conn).work(burst=True)
    for k, job in enumerate(group):
        done = store.get(job.id)
        assert done.status is JobStatus.SUCCEEDED and done.attempts == 2, done
        assert done.metrics.get("cotrain_steps") in (None, 0)  # the second attempt trained alone
        got, want = adapter(settings, f"regrouped-{k}"), adapter(settings, f"solo-{k}")
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
