"""Per-owner quotas (core/quotas.py) on real Redis: the active-jobs count drops entries that no longer hold a
slot (ended records, creations that failed long ago) but keeps creations in flight."""

from __future__ import annotations

import time

import pytest

from core.auth import Principal
from core.jobs import BoneSpec, Job, JobStatus, TrainingSpec
from core.jobstore import JobStore
from core.quotas import RESERVATION_GRACE_S, QuotaExceeded, reserve_active
from core.records import active_key

BOB = Principal("bob", "user", "k")


def _job() -> Job:
    return Job(
        id=Job.new_id(),
        adapter_name="a",
        base_model="embedded",
        dataset={"records": 1},
        bone=BoneSpec(),
        training=TrainingSpec(),
        owner="bob",
    )


def test_admins_and_anonymous_callers_are_not_bound(redis_conn):
    for principal in (Principal("root", "admin", "k"), Principal(None, "admin")):
        for i in range(5):
            reserve_active(redis_conn, principal, f"job-{i}", 1)


def test_ended_records_and_old_failed_creations_free_their_slots(redis_conn):
    store = JobStore(redis_conn)
    ended = _job()
    reserve_active(redis_conn, BOB, ended.id, 3)
    store.create(ended)
    redis_conn.set(f"bone:job:{ended.id}", ended.model_copy(update={"status": JobStatus.CANCELLED}).model_dump_json())
    reserve_active(redis_conn, BOB, "job-failed-long-ago", 3)  # never written
    redis_conn.zadd(active_key("bob"), {"job-failed-long-ago": time.time() - RESERVATION_GRACE_S - 1})
    reserve_active(redis_conn, BOB, "job-in-flight", 3)  # never written yet, but young: keeps its slot
    reserve_active(redis_conn, BOB, "job-new", 3)  # 4 entries: the two stale ones make room
    members = {m.decode() for m in redis_conn.zrange(active_key("bob"), 0, -1)}
    assert members == {"job-in-flight", "job-new"}
    reserve_active(redis_conn, BOB, "job-third", 3)
    with pytest.raises(QuotaExceeded) as over:
        reserve_active(redis_conn, BOB, "job-fourth", 3)
    assert over.value.param == "quota.active_jobs" and over.value.status == 429
