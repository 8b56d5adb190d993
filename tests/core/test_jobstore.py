import pytest

from core.errors import Conflict, NotFound
from core.jobs import BoneSpec, Job, JobStatus, TrainingSpec
from core.jobstore import JobStore


def _job(**overrides) -> Job:
    fields = dict(id=Job.new_id(), adapter_name="a", base_model="embedded", dataset={"records": 1},
                  bone=BoneSpec(), training=TrainingSpec())
    fields.update(overrides)
    return Job(**fields)


def test_create_get_records(redis_conn):
    store = JobStore(redis_conn)
    job = _job()
    store.create(job, records=[{"text": "hi"}])
    assert store.get(job.id) == job
    assert store.records(job.id) == [{"text": "hi"}]
    with pytest.raises(NotFound):
        store.get("job-missing")


def test_list_is_newest_first_with_cursor(redis_conn):
    store = JobStore(redis_conn)
    jobs = [_job(created_at=1000.0 + i) for i in range(5)]
    for job in jobs:
        store.create(job)
    page, more = store.list(limit=2)
    assert [j.id for j in page] == [jobs[4].id, jobs[3].id] and more
    page, more = store.list(limit=2, after=jobs[3].id)
    assert [j.id for j in page] == [jobs[2].id, jobs[1].id] and more
    page, more = store.list(limit=2, after=jobs[1].id)
    assert [j.id for j in page] == [jobs[0].id] and not more


def test_list_filters_by_owner(redis_conn):
    store = JobStore(redis_conn)
    mine = [_job(owner="me", created_at=float(i)) for i in range(3)]
    for i, job in enumerate(mine):
        store.create(job)
        store.create(_job(owner="other", created_at=i + 0.5))
    page, more = store.list(limit=10, owner="me")
    assert {j.id for j in page} == {j.id for j in mine} and not more


def test_final_states_do_not_move(redis_conn):
    store = JobStore(redis_conn)
    job = _job()
    store.create(job)
    store.transition(job.id, [JobStatus.QUEUED], status=JobStatus.CANCELLED)
    with pytest.raises(Conflict):
        store.update(job.id, status=JobStatus.RUNNING)
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_cancel_flag_and_events(redis_conn):
    store = JobStore(redis_conn)
    job = _job()
    store.create(job)
    assert not store.cancel_requested(job.id)
    store.request_cancel(job.id)
    assert store.cancel_requested(job.id)
    ids = [store.add_event(job.id, "step", step=i, loss=1.0 / (i + 1)) for i in range(5)]
    events = store.events(job.id, limit=3)
    assert [e["data"]["step"] for e in events] == [0, 1, 2]
    rest = store.events(job.id, after=events[-1]["id"])
    assert [e["id"] for e in rest] == ids[3:]


def test_status_counts_follow_transitions(redis_conn):
    store = JobStore(redis_conn)
    a, b = _job(), _job()
    store.create(a)
    store.create(b)
    store.transition(a.id, [JobStatus.QUEUED], status=JobStatus.RUNNING)
    store.update(a.id, progress={"step": 3, "total_steps": 10})  # same status: counts unchanged
    store.transition(b.id, [JobStatus.QUEUED], status=JobStatus.CANCELLED)
    counts = {k.decode(): int(v) for k, v in redis_conn.hgetall("bone:jobs:status_counts").items()}
    assert counts == {"queued": 0, "running": 1, "cancelled": 1}
