"""Redis persistence as docker-compose runs it (AOF, appendfsync everysec): a job accepted before Redis
restarts — cleanly, or killed outright — is still there afterwards and runs to the end on a worker started
after the restart. The API process is never restarted. (A SIGKILLed worker is tests/e2e/test_resume.py.)"""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from tests.app.test_faults import RedisProcess, poll
from tests.e2e.conftest import Service
from tests.e2e.test_service import wait_for

pytestmark = pytest.mark.slow

RECORDS = [{"prompt": "Capital of France?\n", "completion": "Paris."}, {"text": "a plain row"}]


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_a_job_accepted_before_a_redis_restart_still_runs(tmp_path, shared_models_dir, how):
    store = RedisProcess(tmp_path / "redis", appendonly=True).start()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    service = Service(data_dir, store.url, tmp_path)
    service.start("api", "api")
    try:
        service.wait_ready()
        with httpx.Client(base_url=service.url, timeout=30) as client:
            created = client.post(
                "/jobs",
                json={
                    "adapter_name": "survivor",
                    "dataset": {"records": RECORDS},
                    "training": {"max_steps": 3, "batch_size": 2},
                },
            )
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]

            if how == "restart":
                store.stop(signal.SIGTERM)  # what `docker compose restart redis` sends
            else:
                time.sleep(3)  # appendfsync everysec: what was acknowledged more than ~2 s ago is on disk
                store.stop(signal.SIGKILL)
            assert client.get(f"/jobs/{job_id}").status_code == 503
            store.start()  # same port, same AOF

            assert poll(lambda: client.get("/readyz").status_code == 200, timeout=30), service.logs()
            assert client.get(f"/jobs/{job_id}").json()["status"] == "queued"
            service.start("worker", "worker")
            job = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=300)
            assert job["status"] == "succeeded", (job, service.logs())
            assert [a["name"] for a in client.get("/adapters").json()["data"]] == ["survivor"]
    finally:
        service.stop()
        store.stop(signal.SIGKILL)
