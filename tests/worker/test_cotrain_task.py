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
    def use(max_jobs: int, max_slowdown: float = 0):
        # No time bound by default here: whether a tiny model's group pays on this CPU is the bound's own test
        update = {"cotrain_max_jobs": max_jobs, "cotrain_max_slowdown": max_slowdown}
        context.use_settings(settings.model_copy(update=update))
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


def test_a_group_that_would_slow_its_members_is_not_formed(cotrain_settings, redis_conn, store, make_job, monkeypatch):
    """The leader times its base's step at its rows and twice them (once per machine, device, base and shape: the
    figure is kept in Redis for the next work-horse); on a device where rows cost in proportion, as on any CPU,
    a companion would double every member's step time: the jobs run one after another, each alone."""
    from worker import cotrain_task
    from worker.cotrain_cost import StepCost

    measured: list[tuple[int, int]] = []

    def proportional(model, rows, length, device):
        measured.append((rows, length))
        return StepCost.from_timings(rows, 0.2 * rows, 0.4 * rows)

    monkeypatch.setattr(cotrain_task.StepCost, "measure", staticmethod(proportional))
    settings = cotrain_settings(8, max_slowdown=1.2)
    jobs = [make_job(rows(k), adapter_name=f"bounded-{k}", max_steps=2, batch_size=2) for k in range(3)]
    assert run_queue(redis_conn, settings, [j.id for j in jobs]) == 3  # each its own RQ task: nobody claimed
    for job in jobs:
        done = store.get(job.id)
        assert done.status is JobStatus.SUCCEEDED and done.co_trained_with == [], done
    # measured at the leader's rows and its rows' padded length (not max_seq_length), once per shape: the next
    # leader of that shape reads it from Redis
    assert measured and all(r == 2 and length < jobs[0].training.max_seq_length for r, length in measured)
    assert len(measured) == len(set(measured)) == redis_conn.hlen(cotrain_task.COST_KEY)
    assert int(redis_conn.hget("bone:metrics:cotrain", "left_out_slowdown_total")) >= 2


def test_a_member_publishing_does_not_hold_the_others_steps(cotrain_settings, redis_conn, store, make_job, monkeypatch):
    from worker import job_steps

    settings = cotrain_settings(8)
    short = make_job(rows(0), adapter_name="short", max_steps=2, batch_size=2)
    long = make_job(rows(1), adapter_name="long", max_steps=40, batch_size=2)
    real_publish, window = job_steps._publish, {}

    def slow_publish(job, *args, **kwargs):
        if job.id == short.id:  # an upload of a big adapter to the registry's store, say
            window["start"] = time.time()
            time.sleep(1.5)
            window["end"] = time.time()
        return real_publish(job, *args, **kwargs)

    monkeypatch.setattr(job_steps, "_publish", slow_publish)
    assert run_queue(redis_conn, settings, [short.id, long.id]) == 1
    assert store.get(short.id).status is JobStatus.SUCCEEDED
    assert store.get(long.id).status is JobStatus.SUCCEEDED
    steps = [e for e in store.events(long.id, limit=1000) if e["type"] == "step"]
    during = [e for e in steps if window["start"] <= e["created_at"] <= window["end"]]
    assert during, "the long job made no step while the short one was publishing"
