"""Uploaded files on several machines: an API and a worker as real processes, each with its own data dir, sharing
only Redis and the registry (a folder, or S3 on a real SeaweedFS). A file uploaded through the API is kept in the
registry's store, so a job naming it succeeds on the worker of the other machine; DELETE removes it there."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import new_service
from tests.e2e.test_service import wait_for

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "capitals.jsonl"
FINAL = {"succeeded", "failed", "cancelled"}


class FolderRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = f"file://{root}"
        self.env: dict[str, str] = {}

    def names(self) -> set[str]:
        files = self.root / ".files"
        return {p.name for p in files.iterdir()} if files.is_dir() else set()


class S3Registry:
    def __init__(self, server, url: str) -> None:
        self.server, self.url, self.env = server, url, server.env

    def names(self) -> set[str]:
        base = self.url[len("s3://") :] + "/.files/"
        # SeaweedFS may keep listing the emptied "folder" itself (as ""): not a file
        return {key[len(base) :] for key in self.server.fs.find(base)} - {""}


@pytest.fixture(params=["folder", "s3"])
def registry(request, tmp_path):
    if request.param == "folder":
        return FolderRegistry(tmp_path / "registry")
    server = request.getfixturevalue("s3_server")
    return S3Registry(server, request.getfixturevalue("s3_url"))


def test_a_file_uploaded_on_one_machine_trains_on_a_worker_of_another(tmp_path, redis_url, shared_models_dir, registry):
    shared = {"BONE_REGISTRY_URL": registry.url, **registry.env}
    api = new_service(tmp_path, redis_url, shared_models_dir, "machine-1", **shared)
    worker = new_service(tmp_path, redis_url, shared_models_dir, "machine-2", **shared)
    try:
        api.start("api", "api")  # machine 1 runs no worker: the job can only run on machine 2
        api.wait_ready()
        worker.start("worker", "worker")
        with httpx.Client(base_url=api.url, timeout=60) as client:
            with EXAMPLE.open("rb") as handle:
                reply = client.post("/files", files={"file": ("capitals.jsonl", handle)})
            assert reply.status_code == 201, reply.text
            info = reply.json()
            file_id = info["id"]
            assert registry.names() == {f"{file_id}.jsonl", f"{file_id}.meta.json"}
            # The API's machine keeps the upload only as a cached copy; the store of record is the registry's.
            assert (api.data_dir / "files" / ".cache" / f"{file_id}.jsonl").is_file()
            assert not list((api.data_dir / "files").glob("*.meta.json"))
            assert [f["id"] for f in client.get("/files").json()["data"]] == [file_id]

            job = {
                "adapter_name": "capitals",
                "dataset": {"file_id": file_id},
                "training": {"max_steps": 2, "batch_size": 4, "max_seq_length": 64},
            }
            reply = client.post("/jobs", json=job)
            assert reply.status_code == 202, reply.text
            done = wait_for(client, reply.json()["id"], FINAL)
            assert done["status"] == "succeeded", (done, api.logs())
            cached = worker.data_dir / "files" / ".cache" / f"{file_id}.jsonl"
            assert cached.read_bytes() == EXAMPLE.read_bytes()  # fetched into the worker's own data dir

            assert client.delete(f"/files/{file_id}").status_code == 200
            assert registry.names() == set()
            assert client.get(f"/files/{file_id}").status_code == 404
            reply = client.post("/jobs", json={**job, "adapter_name": "again"})
            assert reply.status_code == 422 and reply.json()["error"]["param"] == "dataset.file_id", reply.text
    finally:
        worker.stop()
        api.stop()
