"""The app as an operator starts it: ``uvicorn --factory app.main:create_app`` with BONE_* settings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from tests.app.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def test_uvicorn_factory_serves_with_settings_from_the_environment(tmp_path, redis_url, shared_models_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    port = free_port()
    env = {**os.environ, "BONE_DATA_DIR": str(data_dir), "BONE_REDIS_URL": redis_url, "BONE_MAX_NEW_TOKENS": "7"}
    with open(tmp_path / "api.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "app.main:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()
            time.sleep(0.1)
        too_many = httpx.post(url + "/generate", json={"prompt": "hi", "max_new_tokens": 8})
        assert too_many.status_code == 422 and "7" in too_many.json()["error"]["message"]
        assert httpx.post(url + "/generate", json={"prompt": "hi", "max_new_tokens": 7}, timeout=60).status_code == 200
        assert (data_dir / "adapters").is_dir() and (data_dir / "datasets").is_dir()
    finally:
        proc.terminate()
        proc.wait(30)  # uvicorn re-raises SIGTERM after a clean shutdown, so the code is -15 either way
    assert "Application shutdown complete" in (tmp_path / "api.log").read_text()


def test_the_api_never_imports_the_worker(settings):
    script = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        from app.main import create_app
        from core.settings import Settings
        app = create_app(Settings(data_dir={str(settings.data_dir)!r}, redis_url={settings.redis_url!r}))
        with TestClient(app) as client:
            reply = client.post("/jobs", json={{"adapter_name": "x", "dataset": {{"records": [{{"text": "t"}}]}}}})
            assert reply.status_code == 202, reply.text
        print(sorted(m for m in sys.modules if m == "worker" or m.startswith("worker.")))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
