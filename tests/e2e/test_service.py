"""The product's main path over HTTP: POST /jobs → RQ worker trains Bone → registry → POST /generate."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.worker.recipes import MEMORIZE_RECIPE, MEMORIZE_RECORDS

pytestmark = pytest.mark.slow


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.get('status')} after {timeout}s: {job}")


def greedy(client: httpx.Client, adapter: str | None, prompt: str, n: int) -> str:
    reply = client.post("/generate", json={"adapter": adapter, "prompt": prompt, "max_new_tokens": n, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["text"]


def test_train_then_serve_the_adapter(service):
    with httpx.Client(base_url=service.url, timeout=60) as client:
        body = {"adapter_name": "memo", "dataset": {"records": MEMORIZE_RECORDS}, **MEMORIZE_RECIPE}
        created = client.post("/jobs", json=body)
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["status"] == "queued" and job["adapter_name"] == "memo"

        job = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", (job, service.logs())
        assert job["progress"]["step"] == job["progress"]["total_steps"] > 0
        assert job["metrics"]["train_loss"] is not None

        listed = client.get("/adapters").json()["data"]
        assert [a["name"] for a in listed] == ["memo"]
        meta = client.get("/adapters/memo").json()
        assert meta["job_id"] == job["id"] and meta["base_model"] == "embedded" and len(meta["sha256"]) == 64
        assert meta["bone"]["r"] == MEMORIZE_RECIPE["bone"]["r"]

        learned = 0
        for record in MEMORIZE_RECORDS:
            want = record["completion"]
            tuned = greedy(client, "memo", record["prompt"], len(want.encode()))
            base = greedy(client, None, record["prompt"], len(want.encode()))
            assert base != want  # the base model never saw it
            learned += tuned == want
        assert learned == len(MEMORIZE_RECORDS), service.logs()

        # Re-training the same name without overwrite is refused before anything is queued.
        again = client.post("/jobs", json=body)
        assert again.status_code == 409 and again.json()["error"]["param"] == "adapter_name"


def test_cancel_running_and_queued_jobs(service_factory):
    # Co-training off: this is about a job that waits in the queue (with it on, the second job would be claimed
    # into the first one's group and be cancelled at a step boundary: tests/e2e/test_cotrain.py covers that)
    service = service_factory(BONE_COTRAIN_MAX_JOBS="1")
    long_training = {"max_steps": 100_000, "learning_rate": 1e-3, "batch_size": 2}
    records = [{"text": f"row {i} " * 20} for i in range(16)]
    with httpx.Client(base_url=service.url, timeout=60) as client:
        running = client.post(
            "/jobs", json={"adapter_name": "long", "dataset": {"records": records}, "training": long_training}
        ).json()
        queued = client.post(
            "/jobs", json={"adapter_name": "waiting", "dataset": {"records": records}, "training": long_training}
        ).json()
        wait_for(client, running["id"], {"running"}, timeout=120)
        step_seen = wait_for_step(client, running["id"], 2)

        # One worker: the second job is still queued. Cancelling it means it never runs.
        cancelled = client.post(f"/jobs/{queued['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

        started = time.monotonic()
        assert client.post(f"/jobs/{running['id']}/cancel").status_code == 200
        final = wait_for(client, running["id"], {"cancelled", "succeeded", "failed"}, timeout=60)
        assert final["status"] == "cancelled"
        assert time.monotonic() - started < 30
        assert final["progress"]["step"] >= step_seen

        time.sleep(1.0)
        assert client.get(f"/jobs/{queued['id']}").json()["status"] == "cancelled"
        assert client.get("/adapters").json()["data"] == []
        assert client.post(f"/jobs/{running['id']}/cancel").status_code == 409


def wait_for_step(client: httpx.Client, job_id: str, step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["progress"]["step"] >= step:
            return job["progress"]["step"]
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached step {step}")


def test_failed_job_reports_the_real_cause(service):
    with httpx.Client(base_url=service.url, timeout=60) as client:
        records = [{"text": "fine"}, {"text": "fine too"}, {"txt": "typo"}]
        job = client.post("/jobs", json={"adapter_name": "broken", "dataset": {"records": records}})
        assert job.status_code in (202, 422), job.text
        if job.status_code == 422:  # validated up front: even better, as long as the row is named
            assert "row 2" in job.json()["error"]["message"] or "row 3" in job.json()["error"]["message"]
            return
        final = wait_for(client, job.json()["id"], {"succeeded", "failed", "cancelled"})
        assert final["status"] == "failed"
        assert "row" in final["error"] and "text" in final["error"]
