"""`bone-server up` as a user starts it: API + worker, and a private real redis-server when none answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port

pytestmark = pytest.mark.slow


def _children_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return kids + [g for k in kids for g in _descendants(k)]


def test_up_starts_its_own_redis_and_stops_everything_on_sigterm(tmp_path, shared_models_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    port = free_port()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env = {**os.environ, "BONE_DATA_DIR": str(data_dir), "BONE_REDIS_URL": dead_redis, "OMP_NUM_THREADS": "1"}
    env.pop("BONE_AUTH_DISABLED", None)  # as a user runs it: no keys configured, auth not switched off
    env.pop("BONE_API_KEYS", None)
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.3)
        children = _descendants(proc.pid)
        assert len(children) >= 2  # redis-server + worker
        assert (data_dir / "redis" / "redis.log").exists()  # the private Redis keeps its data in the data dir
        assert "started" in (tmp_path / "up.log").read_text()  # ... and the log says which one was started

        # Not open: no key → 401; the local admin key `up` minted, and printed the path of, works.
        key_file = data_dir / "local-admin.key"
        assert f"the local admin key is in {key_file}" in (tmp_path / "up.log").read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/jobs").status_code == 401
        auth = {"Authorization": f"Bearer {key_file.read_text().strip()}"}

        # the worker really is connected: a job gets picked up and finishes
        job = httpx.post(
            f"http://127.0.0.1:{port}/jobs",
            headers=auth,
            json={"adapter_name": "smoke", "dataset": {"records": [{"text": "hello"}]}, "training": {"max_steps": 2}},
        ).json()
        deadline = time.monotonic() + 90
        while httpx.get(f"http://127.0.0.1:{port}/jobs/{job['id']}", headers=auth).json()["status"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.3)

        # The CLI client on the same machine finds the local key by itself.
        listed = subprocess.run(
            [sys.executable, "-m", "cli", "jobs", "list", "--url", f"http://127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0 and job["id"] in listed.stdout, listed.stdout + listed.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _children_alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _children_alive(children) == [], "bone-server up left processes behind"


def test_up_restarts_its_worker_when_it_is_killed(tmp_path, shared_models_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    port = free_port()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # `up` starts a private Redis: the shared one is untouched
    env = {
        **os.environ,
        "BONE_DATA_DIR": str(data_dir),
        "BONE_REDIS_URL": dead_redis,
        "OMP_NUM_THREADS": "1",
        "BONE_AUTH_DISABLED": "true",
        "BONE_RECONNECT_MAX_BACKOFF_S": "2",
    }
    log_path = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--port", str(port)],
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    base = f"http://127.0.0.1:{port}"

    def ready_worker() -> dict | None:
        try:
            answer = httpx.get(f"{base}/readyz", timeout=2)
        except httpx.HTTPError:
            return None
        return answer.json()["worker"] if answer.status_code == 200 else None

    def wait(predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{what}:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.3)
        return value

    try:
        first = wait(lambda: (w := ready_worker()) and w["state"] == "running" and w, 120, "not ready")
        assert first["restarts"] == 0 and first["last_exit"] is None
        os.kill(first["pid"], signal.SIGKILL)
        again = wait(
            lambda: (w := ready_worker()) and w["restarts"] == 1 and w["state"] == "running" and w,
            30,
            "the worker was not restarted",
        )
        assert again["pid"] != first["pid"] and again["last_exit"] == "killed by SIGKILL"
        assert "killed by SIGKILL; restarting it in" in log_path.read_text()

        # the new worker takes jobs
        job = httpx.post(
            f"{base}/jobs",
            json={
                "adapter_name": "after-restart",
                "dataset": {"records": [{"text": "hi"}]},
                "training": {"max_steps": 2},
            },
        ).json()
        wait(lambda: httpx.get(f"{base}/jobs/{job['id']}").json()["status"] == "succeeded", 120, "job not done")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
