"""A worker fleet on one machine: an API and three real `bone-server worker` processes serving resource queues
(two on `bone-training,cpu`, one on `cpu` only), on the real Redis. Several short jobs, one of them on two
processes: every job runs exactly once (one attempt, one start), they spread over more than one worker, and
`GET /workers` / `GET /queues` show the fleet."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.e2e.conftest import Service
from tests.e2e.test_service import wait_for

pytestmark = pytest.mark.slow

ROWS = [{"prompt": f"Q{i}?\n", "completion": f"A{i}."} for i in range(6)]
TRAINING = {"max_steps": 15, "batch_size": 3, "max_seq_length": 32, "learning_rate": 1e-2}
WORKERS = {"w1": "bone-training,cpu", "w2": "bone-training,cpu", "w3": "cpu"}


@pytest.fixture
def fleet(tmp_path, redis_url, shared_models_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    svc = Service(data_dir, redis_url, tmp_path)
    svc.env.update(BONE_QUEUES="cpu,gpu-24g", BONE_MAX_NUM_PROCESSES="2")
    try:
        svc.start("api", "api")
        svc.wait_ready()  # the API builds the embedded model once; the workers then load it
        for name, queues in WORKERS.items():
            svc.start(name, "worker", "--queues", queues)
        yield svc
    finally:
        svc.stop()


def wait_for_workers(client: httpx.Client, n: int, timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    workers: list[dict] = []
    while time.monotonic() < deadline:
        workers = client.get("/workers").json()["data"]
        if len(workers) >= n:
            return workers
        time.sleep(0.5)
    raise AssertionError(f"only {len(workers)} of {n} workers advertised themselves")


def test_jobs_spread_over_the_fleet_and_each_runs_once(fleet):
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        workers = wait_for_workers(client, 3)
        assert sorted(tuple(w["queues"]) for w in workers) == sorted(tuple(q.split(",")) for q in WORKERS.values())
        for w in workers:
            assert w["device"] == "cpu" and w["memory_bytes"] > 0 and w["cpus"] >= 1 and w["heartbeat"] > 0

        # queue validation at enqueue
        bad = client.post("/jobs", json={"adapter_name": "bad", "dataset": {"records": ROWS}, "queue": "gpu-7g"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "queue", bad.text
        too_wide = client.post(
            "/jobs",
            json={"adapter_name": "bad", "dataset": {"records": ROWS}, "training": {**TRAINING, "num_processes": 3}},
        )
        assert too_wide.status_code == 422 and "num_processes" in too_wide.text

        ids = []
        for i in range(6):
            body = {
                "adapter_name": f"fleet-{i}",
                "dataset": {"records": ROWS},
                "training": TRAINING,
                **({"queue": "cpu"} if i % 2 else {}),
            }
            created = client.post("/jobs", json=body)
            assert created.status_code == 202, created.text
            assert created.json()["queue"] == ("cpu" if i % 2 else "bone-training")
            ids.append(created.json()["id"])
        body = {
            "adapter_name": "fleet-ddp",
            "dataset": {"records": ROWS},
            "queue": "cpu",
            "training": {**TRAINING, "num_processes": 2, "batch_size": 4},
        }
        created = client.post("/jobs", json=body)
        assert created.status_code == 202, created.text
        ids.append(created.json()["id"])

        queues = {q["name"]: q for q in client.get("/queues").json()["data"]}
        assert set(queues) >= {"bone-training", "cpu", "gpu-24g"}
        assert (queues["bone-training"]["workers"], queues["cpu"]["workers"], queues["gpu-24g"]["workers"]) == (2, 3, 0)

        jobs = [wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=400) for job_id in ids]
        assert all(j["status"] == "succeeded" for j in jobs), (
            [(j["id"], j["status"], j["error"]) for j in jobs],
            fleet.logs(),
        )
        names = {w["name"] for w in workers}
        for job in jobs:
            starts = [
                e
                for e in client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
                if e["type"] == "status" and e["data"].get("status") == "running"
            ]
            assert job["attempts"] == 1 and len(starts) == 1, job  # ran exactly once
            assert job["worker"] in names and starts[0]["data"]["worker"] == job["worker"]
        assert len({j["worker"] for j in jobs}) > 1, [j["worker"] for j in jobs]  # spread over the fleet
        by_name = {w["name"]: w for w in workers}
        for job in jobs:  # each ran on a worker serving its queue
            assert job["queue"] in by_name[job["worker"]]["queues"]
        assert jobs[-1]["metrics"]["num_processes"] == 2

        adapters = sorted(a["name"] for a in client.get("/adapters").json()["data"])
        assert adapters == sorted([f"fleet-{i}" for i in range(6)] + ["fleet-ddp"])
        queues = {q["name"]: q for q in client.get("/queues").json()["data"]}
        assert queues["cpu"]["depth"] == queues["bone-training"]["depth"] == 0
