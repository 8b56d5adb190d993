"""Scale-out as deployed: two `bone-server api` replicas and a worker as real processes, sharing one Redis and
one adapter registry on S3 (a real SeaweedFS on loopback), each with its own data dir. A job accepted by
replica A is trained by the worker, published to S3, and served by replica B, which loads it on first use
without a restart; a delete through B is seen by A at once."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import Service
from tests.e2e.test_service import greedy, wait_for
from tests.worker.recipes import MEMORIZE_RECIPE, MEMORIZE_RECORDS

pytestmark = pytest.mark.slow


@pytest.fixture
def replicas(tmp_path, redis_url, shared_models_dir, s3_server, s3_url):  # noqa: F811
    services = []
    for label in ("a", "b"):
        root = tmp_path / label
        (root / "data").mkdir(parents=True)
        (root / "data" / "models").symlink_to(shared_models_dir, target_is_directory=True)
        svc = Service(root / "data", redis_url, root)
        svc.env.update(s3_server.env, BONE_REGISTRY_URL=s3_url)
        services.append(svc)
    a, b = services
    try:
        a.start("api", "api")
        a.start("worker", "worker")
        a.wait_ready()  # A builds the embedded base model once; B then loads it from the shared folder
        b.start("api", "api")
        b.wait_ready()
        yield a, b
    finally:
        for svc in services:
            svc.stop()


def test_a_job_from_replica_a_is_served_by_replica_b(replicas):
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=60) as api_a, httpx.Client(base_url=b.url, timeout=60) as api_b:
        assert api_b.get("/adapters").json()["data"] == []
        body = {"adapter_name": "memo", "dataset": {"records": MEMORIZE_RECORDS}, **MEMORIZE_RECIPE}
        created = api_a.post("/jobs", json=body)
        assert created.status_code == 202, created.text

        # The job is in the shared Redis: B reports it too, and its outcome.
        job = wait_for(api_b, created.json()["id"], {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", (job, a.logs())

        listed = api_b.get("/adapters").json()["data"]
        assert [m["name"] for m in listed] == ["memo"]
        sha = listed[0]["sha256"]
        assert api_a.get("/adapters/memo").json()["sha256"] == sha

        for record in MEMORIZE_RECORDS[:3]:
            want = record["completion"]
            assert greedy(api_b, "memo", record["prompt"], len(want.encode())) == want, b.logs()
        # B read the weights from S3 into its own cache (keyed by sha256); A never needed them.
        assert (b.data_dir / "registry-cache" / f"{sha}.safetensors").is_file()
        assert not (a.data_dir / "registry-cache").exists()
        assert not (b.data_dir / "adapters").exists() and not (a.data_dir / "adapters").exists()

        assert api_b.delete("/adapters/memo").status_code == 200
        gone = api_a.post("/generate", json={"adapter": "memo", "prompt": "x", "max_new_tokens": 1})
        assert gone.status_code == 404, gone.text
        assert api_a.get("/adapters").json()["data"] == []
