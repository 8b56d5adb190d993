"""Dockerfile, compose file and entrypoint, checked without a Docker engine (none runs on these machines):
the Compose Specification schema, the real Compose v2 binary's `config -q`, hadolint, and the entrypoint's
roles run outside a container."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _compose_binary() -> str:
    compose = pytest.importorskip("compose")
    # The wheel's `docker-compose` wrapper always exits 0; call the Go binary it ships directly.
    return str(Path(compose.__file__).parent / "docker-compose")


def test_compose_file_matches_the_compose_specification():
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_config_resolves_with_required_secret(tmp_path):
    env = {**os.environ, "BONE_API_KEYS": "admin:secret"}
    result = subprocess.run(
        [_compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    services = subprocess.run(
        [_compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "--profile", "gpu", "config", "--services"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert set(services.stdout.split()) == {"redis", "api", "worker", "worker-gpu-0", "worker-gpu-1"}


def test_compose_refuses_to_start_without_the_api_keys():
    env = {k: v for k, v in os.environ.items() if k != "BONE_API_KEYS"}
    result = subprocess.run(
        [_compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "BONE_API_KEYS" in result.stderr


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2  # multi-stage
    assert "USER bone" in text and "HEALTHCHECK" in text and "ARG BASE_IMAGE" in text
    # dependencies are installed before the code is copied, so code changes keep the dependency layer
    assert text.index("pip install . ") < text.index("COPY bone ")


def _entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **env}
    return subprocess.run(
        ["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def test_entrypoint_roles_dispatch_to_the_cli():
    for role in ("api", "worker", "up"):
        result = _entrypoint(role, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, (role, result.stderr)
    assert _entrypoint("echo", "passthrough").stdout.strip() == "passthrough"


def test_entrypoint_healthcheck_follows_healthz():
    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _entrypoint("healthcheck", BONE_PORT=str(server.server_port)).returncode == 0
    finally:
        server.shutdown()
    assert _entrypoint("healthcheck", BONE_PORT=str(server.server_port)).returncode != 0  # nothing listens now


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_entrypoint_is_posix_sh():
    assert (ROOT / "docker" / "entrypoint.sh").read_text().startswith("#!/bin/sh")


def test_each_gpu_worker_reserves_its_own_gpu():
    env = {**os.environ, "BONE_API_KEYS": "admin:secret"}
    result = subprocess.run(
        [_compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "--profile", "gpu", "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    gpu_workers = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    ids = [
        tuple(d["device_ids"])
        for s in gpu_workers.values()
        for d in s["deploy"]["resources"]["reservations"]["devices"]
    ]
    assert len(ids) == len(gpu_workers) >= 2 and len(set(ids)) == len(ids)  # one distinct GPU each
    assert all(s["command"][:3] == ["worker", "--device", "cuda:0"] for s in gpu_workers.values())
