"""The server holds its ground, as `bone-server api` runs it (a real process on a loopback port): slow-header
clients (slowloris) are cut off while others are served, the dashboard carries its security headers, error
messages name no server path, and the files it writes are not readable by other users."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_REDIS_URL
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HEADER_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def api(tmp_path_factory, shared_models_dir):
    folder = tmp_path_factory.mktemp("http-server")
    data_dir = folder / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    port = free_port()
    env = {
        **os.environ,
        "BONE_DATA_DIR": str(data_dir),
        "BONE_REDIS_URL": TEST_REDIS_URL,
        "BONE_PORT": str(port),
        "BONE_AUTH_DISABLED": "true",
        "BONE_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "OMP_NUM_THREADS": "1",
    }
    log = folder / "api.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "api"], env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)
    try:
        yield url, port, data_dir
    finally:
        proc.terminate()
        proc.wait(30)


def slowloris(port: int, closed_after: list[float], seconds: float = 30) -> None:
    """One connection sending a request head one byte a second; records when the server closed it."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(1.0)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - started < seconds:
            try:
                sock.sendall(b"X")  # a header name that never ends
                if sock.recv(1024) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:  # reset: closed as well
                break
        else:
            return
    closed_after.append(time.monotonic() - started)


def test_row12_slowloris_connections_are_cut_off_while_others_are_served(api):
    url, port, _ = api
    closed_after: list[float] = []
    attackers = [threading.Thread(target=slowloris, args=(port, closed_after)) for _ in range(20)]
    for thread in attackers:
        thread.start()
    time.sleep(1)
    served = []
    with httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(5):  # served meanwhile, promptly
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            served.append(time.monotonic() - started)
            time.sleep(0.2)
    for thread in attackers:
        thread.join(40)
    print(
        f"closed after {min(closed_after or [0]):.2f}-{max(closed_after or [0]):.2f} s; "
        f"healthz {min(served):.3f}-{max(served):.3f} s"
    )
    assert len(closed_after) == 20, f"only {len(closed_after)} of 20 slow connections were closed"
    assert max(closed_after) < HEADER_TIMEOUT_S + 3, closed_after
    assert max(served) < 1.0, served


def test_an_oversized_request_head_is_cut_off_at_once(api):
    _, port, _ = api
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(HEADER_TIMEOUT_S + 5)
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000)
            answer = sock.recv(1024)
        except OSError:  # reset while sending: closed as well
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    assert time.monotonic() - started < HEADER_TIMEOUT_S


def test_pipelined_and_large_body_requests_are_served(api):
    url, port, _ = api
    with socket.create_connection(("127.0.0.1", port)) as sock:  # two requests in one write
        sock.settimeout(10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while received.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    # a body far over the head bound, arriving with the head, is the route's business (here: a 422)
    answer = httpx.post(
        url + "/generate",
        content=b'{"prompt": "' + b"a" * 300_000 + b'"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert answer.status_code in (413, 422), answer.text[:200]


def test_a_prompt_client_on_a_kept_alive_connection_is_not_cut_off(api):
    url, _, _ = api
    with httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(1)  # idle under the keep-alive timeout: the same connection serves the next one


@pytest.mark.parametrize("path", ["/ui/", "/ui/app.js", "/ui/style.css"])
def test_the_dashboard_carries_security_headers(api, path):
    url, _, _ = api
    answer = httpx.get(url + path)
    assert answer.status_code == 200
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"


def test_the_dashboard_has_no_inline_script_or_style():
    """What the CSP forbids: inline <script>/<style> blocks and on*= / style= attributes."""
    html = (ROOT / "app" / "static" / "index.html").read_text()
    import re

    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert "<style" not in html
    assert not re.search(r"\s(on[a-z]+|style)\s*=", html)


ERROR_REQUESTS = [
    ("post", "/jobs", {"adapter_name": "x", "dataset": {"path": "missing.jsonl"}}),
    ("post", "/jobs", {"adapter_name": "x", "dataset": {"path": "../outside.jsonl"}}),
    ("post", "/jobs", {"adapter_name": "x", "dataset": {"path": "sub/../../x.jsonl"}}),
    ("post", "/jobs", {"adapter_name": "x", "dataset": {"path": "nested/missing.jsonl"}}),
    ("post", "/jobs", {"adapter_name": "x", "dataset": {"records": [{"text": "a"}]}, "base_model": "models/nothing"}),
    ("post", "/generate", {"adapter": "missing", "prompt": "a"}),
    ("get", "/adapters/missing", None),
    ("get", "/files/file-missing", None),
]


@pytest.mark.parametrize("method, path, body", ERROR_REQUESTS)
def test_error_messages_name_no_server_path(api, method, path, body):
    url, _, data_dir = api
    answer = httpx.request(method.upper(), url + path, json=body, timeout=30)
    assert answer.status_code >= 400
    text = json.dumps(answer.json())
    for server_path in {str(data_dir), str(data_dir.resolve()), tempfile.gettempdir() + "/", str(ROOT), sys.prefix}:
        assert server_path not in text, text


def test_a_corrupted_adapter_is_refused_by_name_not_by_path(api):
    url, _, data_dir = api
    from core.registry import AdapterRegistry

    source = data_dir.parent / "src"
    source.mkdir(exist_ok=True)
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, source / "adapter_model.safetensors")
    (source / "adapter_config.json").write_text(json.dumps({"peft_type": "BONE", "r": 4}))
    registry = AdapterRegistry(data_dir / "adapters")
    registry.publish("broken", source, {"base_model": "embedded", "bone": {"r": 4}})
    (data_dir / "adapters" / "broken" / "adapter_model.safetensors").write_bytes(b"not these bytes")
    answer = httpx.get(url + "/adapters/broken/download")
    assert answer.status_code >= 400
    message = answer.json()["error"]["message"]
    assert "broken/adapter_model.safetensors" in message and str(data_dir) not in message


def test_files_the_server_writes_are_not_readable_by_others(api):
    url, _, data_dir = api
    answer = httpx.post(url + "/files", files={"file": ("train.jsonl", b'{"text": "hello"}\n')})
    assert answer.status_code == 201, answer.text
    written = [p for p in (data_dir / "files").rglob("*") if p.is_file()]
    assert written
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0, f"{path.name} is {oct(mode)}"
