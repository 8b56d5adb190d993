"""Liveness, readiness, and a Redis that is not there (then comes back)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from tests.app.conftest import LiveServer, free_port, make_settings


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


@pytest.fixture
def server_without_redis(tmp_path, shared_models_dir):
    port = free_port()  # nothing listens here
    settings = make_settings(tmp_path / "data", shared_models_dir, redis_url=f"redis://127.0.0.1:{port}/0")
    with LiveServer(settings) as server:
        yield server, port


def test_redis_unreachable_is_503_fast_and_recovers(server_without_redis, tmp_path):
    server, redis_port = server_without_redis
    with server.client(timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # alive: restarting would not help
        for method, path, body in [
            ("GET", "/readyz", None),
            ("GET", "/jobs", None),
            ("GET", "/jobs/job-x", None),
            ("POST", "/jobs", {"adapter_name": "a", "dataset": {"records": [{"text": "x"}]}}),
            ("POST", "/jobs/job-x/cancel", None),
        ]:
            started = time.monotonic()
            reply = client.request(method, path, json=body)
            assert reply.status_code == 503, (path, reply.text)
            error = reply.json()["error"]
            assert error["type"] == "service_unavailable" and "Redis unreachable" in error["message"]
            assert time.monotonic() - started < 3, path
        # What needs no Redis keeps working.
        assert client.get("/adapters").status_code == 200
        assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200

        if shutil.which("redis-server") is None:
            pytest.skip("no redis-server on PATH to bring Redis back")
        redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the API did not notice Redis coming back"
                time.sleep(0.1)
            assert client.get("/jobs").json()["data"] == []
        finally:
            redis_proc.terminate()
            redis_proc.wait(10)
