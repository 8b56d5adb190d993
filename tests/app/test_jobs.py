"""Jobs over HTTP: create → stored and enqueued on the real Redis/RQ; list, cancel, events (JSON and SSE).
No worker runs here: the full path with a worker process lives in tests/e2e."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import redis
from rq import Queue
from rq.job import Job as RQJob
from rq.job import JobStatus as RQStatus

from core.jobs import JobStatus
from core.jobstore import JobStore
from tests.app.conftest import publish_adapter

RECORDS = [{"prompt": "2+2=", "completion": "4"}, {"text": "plain text row"}]


def create(client: httpx.Client, name: str = "tuned", **fields) -> dict:
    reply = client.post("/jobs", json={"adapter_name": name, "dataset": {"records": RECORDS}, **fields})
    assert reply.status_code == 202, reply.text
    return reply.json()


def test_create_stores_and_enqueues_by_dotted_path(client, live, redis_conn):
    job = create(client, bone={"r": 16, "target_modules": ["q_proj", "v_proj"]}, training={"max_steps": 7})
    assert job["status"] == "queued" and job["id"].startswith("job-")
    assert job["base_model"] == "embedded" and job["dataset"] == {"records": 2}
    assert job["bone"]["r"] == 16 and job["training"]["max_steps"] == 7

    assert client.get(f"/jobs/{job['id']}").json() == job
    assert JobStore(redis_conn).records(job["id"]) == RECORDS  # inline rows stored apart from the record

    queue = Queue(live.settings.queue_name, connection=redis_conn)
    assert queue.job_ids == [job["id"]]
    rq_job = RQJob.fetch(job["id"], connection=redis_conn)
    assert rq_job.func_name == "worker.tasks.run_training_job" and rq_job.args == (job["id"],)
    assert rq_job.timeout == live.settings.job_timeout_s  # never RQ's 180 s default


def test_path_dataset_inside_the_datasets_dir(client, live):
    folder = live.settings.datasets_dir / "team"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text(json.dumps({"text": "a row"}) + "\n")
    job = create(client, dataset={"path": "team/train.jsonl"})
    assert job["dataset"] == {"path": "team/train.jsonl"}


def test_symlink_out_of_the_datasets_dir_is_refused(client, live, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    live.settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    link = live.settings.datasets_dir / "innocent.jsonl"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    reply = client.post("/jobs", json={"adapter_name": "x", "dataset": {"path": "innocent.jsonl"}})
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "dataset.path"


def test_existing_adapter_is_409_unless_overwrite(client, live):
    publish_adapter(live.settings, "taken", seed=1)
    reply = client.post("/jobs", json={"adapter_name": "taken", "dataset": {"records": RECORDS}})
    assert reply.status_code == 409
    assert reply.json()["error"] | {"message": None} == {
        "message": None,
        "type": "conflict",
        "param": "adapter_name",
        "code": "adapter_exists",
    }
    assert client.get("/jobs").json()["data"] == []
    assert create(client, "taken", overwrite=True)["overwrite"] is True


def test_list_is_newest_first_with_a_cursor(client):
    ids = [create(client, f"a{i}")["id"] for i in range(5)]
    page = client.get("/jobs", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    rest = client.get("/jobs", params={"limit": 10, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False


def test_cancel_a_queued_job_means_it_never_runs(client, redis_conn):
    job = create(client)
    reply = client.post(f"/jobs/{job['id']}/cancel")
    assert reply.status_code == 200
    cancelled = reply.json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert RQJob.fetch(job["id"], connection=redis_conn).get_status() == RQStatus.CANCELED
    assert JobStore(redis_conn).cancel_requested(job["id"])  # a worker racing for it would stop too
    time.sleep(0.2)
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"

    again = client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"


def test_cancel_a_running_job_sets_the_flag_the_worker_polls(client, redis_conn):
    job = create(client)
    store = JobStore(redis_conn)
    store.transition(job["id"], [JobStatus.QUEUED], status=JobStatus.RUNNING)  # as a worker would
    reply = client.post(f"/jobs/{job['id']}/cancel")
    assert reply.status_code == 200 and reply.json()["status"] == "running"
    assert store.cancel_requested(job["id"])


def test_events_page_by_cursor(client, redis_conn):
    job = create(client)
    store = JobStore(redis_conn)
    for step in range(5):
        store.add_event(job["id"], "metrics", step=step, loss=1.0 / (step + 1))
    first = client.get(f"/jobs/{job['id']}/events", params={"limit": 3}).json()
    assert [e["data"]["step"] for e in first["data"]] == [0, 1, 2] and first["has_more"] is True
    rest = client.get(f"/jobs/{job['id']}/events", params={"after": first["data"][-1]["id"]}).json()
    assert [e["data"]["step"] for e in rest["data"]] == [3, 4] and rest["has_more"] is False


def read_sse(response: httpx.Response) -> list[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream, read to its end."""
    events, name, data = [], "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            events.append((name, "\n".join(data)))
            name, data = "message", []
    return events


def test_events_stream_follows_a_live_job_until_it_is_final(client, redis_conn):
    job = create(client)
    store = JobStore(redis_conn)
    store.add_event(job["id"], "message", "started")
    store.transition(job["id"], [JobStatus.QUEUED], status=JobStatus.RUNNING)

    def worker():
        for step in range(3):
            time.sleep(0.2)
            store.add_event(job["id"], "metrics", step=step)
        store.update(job["id"], status=JobStatus.SUCCEEDED, finished_at=time.time())

    threading.Thread(target=worker).start()
    started = time.monotonic()
    with client.stream("GET", f"/jobs/{job['id']}/events", headers={"accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        events = read_sse(response)
    assert time.monotonic() - started < 10
    names = [name for name, _ in events]
    assert names == ["event"] * 4 + ["end"]
    assert [json.loads(d)["data"].get("step") for _, d in events[1:4]] == [0, 1, 2]
    assert json.loads(events[-1][1])["status"] == "succeeded"


def test_events_stream_resumes_after_last_event_id(client, redis_conn):
    job = create(client)
    store = JobStore(redis_conn)
    first = store.add_event(job["id"], "metrics", step=0)
    store.add_event(job["id"], "metrics", step=1)
    store.update(job["id"], status=JobStatus.FAILED, error="boom", finished_at=time.time())
    with client.stream("GET", f"/jobs/{job['id']}/events?stream=true", headers={"last-event-id": first}) as response:
        events = read_sse(response)
    assert [json.loads(d)["data"]["step"] for n, d in events if n == "event"] == [1]
    assert json.loads(events[-1][1])["error"] == "boom"


def test_redis_client_has_short_timeouts(live):
    kwargs = live.app.state.redis.connection_pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] <= 2 and kwargs["socket_timeout"] <= 10
    assert isinstance(live.app.state.redis, redis.Redis)


def test_checkpoints_are_listed_with_their_adapters(client, redis_conn):
    job = create(client, training={"save_every": 2, "publish_checkpoints": True})
    store = JobStore(redis_conn)
    assert client.get(f"/jobs/{job['id']}/checkpoints").json() == {"object": "list", "data": [], "has_more": False}
    store.add_checkpoint(job["id"], 4, {"adapter": "tuned-step-4", "train_loss": 0.5, "eval_loss": None})
    store.add_checkpoint(job["id"], 2, {"adapter": "tuned-step-2", "train_loss": 0.9, "eval_loss": None})
    listed = client.get(f"/jobs/{job['id']}/checkpoints").json()["data"]
    assert [(c["step"], c["adapter"], c["job_id"]) for c in listed] == [
        (2, "tuned-step-2", job["id"]),
        (4, "tuned-step-4", job["id"]),
    ]
    assert client.get("/jobs/job-nope/checkpoints").status_code == 404


def test_cancelling_a_requeued_job_removes_its_checkpoint_adapters(client, live, redis_conn):
    job = create(client, training={"save_every": 2, "publish_checkpoints": True})
    info = publish_adapter(live.settings, "tuned-step-2", seed=1)
    registry_meta = live.settings.registry_dir / "tuned-step-2" / "metadata.json"
    registry_meta.write_text(json.dumps({**info.model_dump(), "job_id": job["id"]}))
    JobStore(redis_conn).add_checkpoint(job["id"], 2, {"adapter": "tuned-step-2"})
    assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert client.get("/adapters/tuned-step-2").status_code == 404


def test_inline_validation_records_are_stored_apart(client, redis_conn):
    held = [{"text": "held out"}]
    job = create(client, validation_dataset={"records": held, "format": "text"}, training={"eval_every": 3})
    assert job["validation_dataset"] == {"records": 1, "format": "text"}
    assert JobStore(redis_conn).records(job["id"], "validation_records") == held


@pytest.mark.parametrize(
    "body, param",
    [
        ({"dataset": {"records": [{"text": "x"}], "format": "messages"}}, "dataset.records.0.messages"),
        ({"validation_dataset": {"records": [{"txt": "typo"}]}}, "validation_dataset.records.0"),
        ({"training": {"early_stopping_patience": 2}}, "training"),
        ({"training": {"publish_checkpoints": True}}, "training"),
        ({"adapter_name": "n" * 60, "training": {"save_every": 2, "publish_checkpoints": True}}, "adapter_name"),
        ({"dataset": {"hf_dataset": "/etc"}}, "dataset.hf_dataset"),
        ({"training": {"eval_every": 3}}, None),  # eval needs rows: a validation_dataset or eval_fraction
    ],
)
def test_training_fields_are_checked_before_queueing(client, body, param):
    reply = client.post("/jobs", json={"adapter_name": "ok", "dataset": {"records": RECORDS}, **body})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == param
