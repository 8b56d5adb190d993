"""Co-training made visible on the real server: a job's record names the jobs it trained with (its own owner's
by id, others only counted), and /metrics exports the figures the workers push through Redis."""

from __future__ import annotations

import redis

from core.jobs import BoneSpec, Job, TrainingSpec
from core.jobstore import JobStore
from tests.app.test_observability import scrape
from tests.conftest import TEST_REDIS_URL


def stored_job(store: JobStore, owner: str | None) -> Job:
    job = Job(
        id=Job.new_id(),
        adapter_name="a",
        base_model="embedded",
        dataset={"records": 1},
        bone=BoneSpec(),
        training=TrainingSpec(),
        owner=owner,
    )
    store.create(job)
    return job


def test_a_job_names_its_owners_partners_and_counts_the_others(client):
    reply = client.post("/jobs", json={"adapter_name": "cotrained", "dataset": {"records": [{"text": "x"}]}})
    assert reply.status_code == 202
    body = reply.json()
    assert body["co_trained_with"] == [] and body["co_trained_with_others"] == 0
    assert body["estimated_base_bytes"] > 0 and body["estimated_device_bytes"] > body["estimated_base_bytes"]

    store = JobStore(redis.Redis.from_url(TEST_REDIS_URL))
    job = store.get(body["id"])  # owner None: keys are off on this server, as for every job it accepts
    mine = [stored_job(store, None) for _ in range(2)]
    theirs = [stored_job(store, "someone-else") for _ in range(3)]
    store.add_co_trained_with(job, [mine[0], theirs[0], theirs[1]])
    store.add_co_trained_with(job, [mine[0], mine[1], theirs[1], theirs[2]])  # a later group: counted once each

    shown = client.get(f"/jobs/{job.id}").json()
    assert shown["co_trained_with"] == sorted(j.id for j in mine)
    assert shown["co_trained_with_others"] == 3
    assert not any(j.id in str(shown) for j in theirs)
    events = [e for e in client.get(f"/jobs/{job.id}/events").json()["data"] if e["type"] == "co_training"]
    assert [e["data"] for e in events] == [
        {"co_trained_with": [mine[0].id], "others": 2},
        {"co_trained_with": [mine[1].id], "others": 1},  # only who is new to it
    ]
    assert not any(j.id in str(events) for j in theirs)
    listed = next(j for j in client.get("/jobs").json()["data"] if j["id"] == job.id)
    assert listed["co_trained_with"] == shown["co_trained_with"]

    schema = client.get("/openapi.json").json()["components"]["schemas"]["Job"]["properties"]
    assert {"co_trained_with", "co_trained_with_others", "estimated_base_bytes"} <= set(schema)


def test_metrics_show_co_training_groups_and_rows(client):
    before = scrape(client)
    assert "bone_cotrain_groups_total" not in before  # nothing pushed yet (Redis flushed for this test)
    store = JobStore(redis.Redis.from_url(TEST_REDIS_URL))
    store.record_cotrain_group(3)
    store.record_cotrain_rows({"job-a": 2, "job-b": 4, "job-c": 2})
    store.record_cotrain_rows({"job-a": 2, "job-b": 4})
    store.record_cotrain_members(2)  # job-c left the group
    store.record_cotrain_rows({})  # a micro-batch of nobody is not one
    store.record_cotrain_left_out(2)
    store.record_cotrain_left_out(1)

    after = scrape(client)
    assert after["bone_cotrain_groups_total"] == 1
    assert after["bone_cotrain_members"] == 2
    assert after["bone_cotrain_rows_total"] == 14
    assert after["bone_cotrain_member_steps_total"] == 5
    assert after["bone_cotrain_micro_batches_total"] == 2
    assert after["bone_cotrain_left_out_slowdown_total"] == 3
    assert not any("job-a" in name for name in after)  # no per-job labels
