"""The whole service as a user runs it: `bone-server api` and `bone-server worker` as real processes,
on the real Redis, talking HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    def __init__(self, data_dir: Path, redis_url: str, log_dir: Path) -> None:
        self.data_dir, self.redis_url, self.log_dir = data_dir, redis_url, log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "BONE_DATA_DIR": str(data_dir),
            "BONE_REDIS_URL": redis_url,
            "BONE_PORT": str(self.port),
            "BONE_LOG_LEVEL": "info",
            # API and worker share 2 cores in CI: one torch thread each avoids oversubscription.
            "OMP_NUM_THREADS": "1",
        }
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, role: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{role}.log", "ab")
        # A session of its own: a test can kill the whole process group, as a lost machine would.
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
        )
        self.procs[role] = proc
        return proc

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["api"].poll() is not None:
                raise RuntimeError("api exited:\n" + (self.log_dir / "api.log").read_text()[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("api not ready:\n" + (self.log_dir / "api.log").read_text()[-3000:])

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.log_dir.glob("*.log"))


def new_service(tmp_path: Path, redis_url: str, models_dir: Path, name: str = "data", **env: str) -> Service:
    """A service (not started) on a fresh data dir that reuses the session's embedded model."""
    data_dir = tmp_path / name
    data_dir.mkdir()
    (data_dir / "models").symlink_to(models_dir, target_is_directory=True)
    svc = Service(data_dir, redis_url, tmp_path)
    svc.env.update(env)
    return svc


@contextmanager
def running(svc: Service):
    """The api and worker processes of ``svc``, ready, for the block; stopped afterwards whatever happens."""
    svc.start("api", "api")
    svc.start("worker", "worker")
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def service(tmp_path, redis_url, shared_models_dir):
    with running(new_service(tmp_path, redis_url, shared_models_dir)) as svc:
        yield svc


@pytest.fixture
def keyed_service(tmp_path, redis_url, shared_models_dir):
    """The service as `make run` starts it: no BONE_API_KEYS, so the API mints the local admin key into its data
    dir. Its API also accepts jobs on the queue `idle`, which no worker serves (jobs there stay queued)."""
    svc = new_service(
        tmp_path, redis_url, shared_models_dir, "bone-data", BONE_AUTH_DISABLED="false", BONE_QUEUES="idle"
    )
    with running(svc):
        yield svc


@pytest.fixture
def service_factory(tmp_path, redis_url, shared_models_dir):
    """Like ``service``, with extra environment for both processes (e.g. ``BONE_API_KEYS``)."""
    started = 0
    with ExitStack() as stack:

        def start(**env: str) -> Service:
            nonlocal started
            started += 1
            svc = new_service(tmp_path, redis_url, shared_models_dir, f"data{started}", **env)
            if "BONE_API_KEYS" in env:
                svc.env.pop("BONE_AUTH_DISABLED", None)  # keys given: the suite's default of no auth does not apply
            return stack.enter_context(running(svc))

        yield start
