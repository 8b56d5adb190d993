import pytest

from core.errors import Conflict, NotFound
from core.jobs import BoneSpec, Job, JobStatus, TrainingSpec
from core.jobstore import JobStore


def _job(**overrides) -> Job:
    fields = dict(
        id=Job.new_id(),
        adapter_name="a",
        base_model="embedded",
        dataset={"records": 1},
        bone=BoneSpec(),
        training=TrainingSpec(),
    )
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


def test_owner_listing_reads_the_owners_index_and_backfills_older_records(redis_conn):
    import core.records as records

    store = JobStore(redis_conn)
    old = _job(owner="me", created_at=1.0)
    redis_conn.set(f"bone:job:{old.id}", old.model_dump_json())  # stored before per-owner indexes existed
    redis_conn.zadd("bone:jobs", {old.id: old.created_at})
    records._indexed.discard("bone:jobs")
    new = _job(owner="me", created_at=2.0)
    store.create(new)
    store.create(_job(owner="other", created_at=3.0))
    page, more = store.list(owner="me")
    assert [j.id for j in page] == [new.id, old.id] and not more
    assert redis_conn.zcard("bone:jobs:owner:me") == 2


def test_a_record_that_no_longer_validates_is_skipped_by_listings(redis_conn):
    store = JobStore(redis_conn)
    good, bad = _job(owner="me", created_at=1.0), _job(owner="me", created_at=2.0)
    store.create(good)
    store.create(bad)
    raw = redis_conn.get(f"bone:job:{bad.id}").decode().replace('"weight_decay":0.0', '"weight_decay":1e309')
    redis_conn.set(f"bone:job:{bad.id}", raw)
    for owner in ("me", None):
        page, _ = store.list(owner=owner)
        assert [j.id for j in page] == [good.id]


def test_ending_a_job_deletes_its_inline_records_and_frees_its_active_slot(redis_conn):
    store = JobStore(redis_conn)
    job = _job(owner="me")
    store.create(job, records=[{"text": "a"}], validation_records=[{"text": "b"}], records_ttl_s=600)
    assert 0 < redis_conn.ttl(f"bone:job:{job.id}:records") <= 600
    assert redis_conn.zscore("bone:owner:me:active", job.id) is not None
    store.transition(job.id, None, status=JobStatus.RUNNING)
    assert store.records(job.id) == [{"text": "a"}]
    store.transition(job.id, None, status=JobStatus.SUCCEEDED)
    assert store.records(job.id) is None and store.records(job.id, "validation_records") is None
    assert redis_conn.zscore("bone:owner:me:active", job.id) is None


def test_a_record_accepted_under_older_rules_still_loads(redis_conn):
    """batch_size must split evenly over num_processes for NEW jobs; a job queued before that rule (batch 3 on
    2 processes) is still read, listed and moved through its states, never silently dropped."""
    store = JobStore(redis_conn)
    job = _job(
        training=TrainingSpec.model_construct(**{**TrainingSpec().model_dump(), "batch_size": 3, "num_processes": 2})
    )
    store.create(job)
    with pytest.raises(ValueError, match="multiple of num_processes"):
        TrainingSpec(batch_size=3, num_processes=2)
    assert store.get(job.id).training.batch_size == 3
    assert [j.id for j in store.list(limit=10)[0]] == [job.id]
    store.transition(job.id, None, status=JobStatus.CANCELLED)
    assert store.get(job.id).status is JobStatus.CANCELLED
