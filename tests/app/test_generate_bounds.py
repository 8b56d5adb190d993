"""Bounds of POST /generate over a real server: 422 beyond the token limits, 429 with Retry-After when the
queue is full, the request timeout, and a client that hangs up freeing its batch slot (streamed or not)."""

from __future__ import annotations

import socket
import threading
import time

import httpx

# One row at a time and a short queue, so "full" is easy to reach; long generations to hang up on.
SERVER_SETTINGS = {
    "max_batch_size": 1,
    "max_queue": 1,
    "max_new_tokens": 1500,
    "max_prompt_tokens": 64,
    "request_timeout_s": 4.0,
    "batch_wait_ms": 0,
}
LONG = {"prompt": "Tell me everything", "max_new_tokens": 1500, "temperature": 0}


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_token_bounds_are_422_naming_the_field(client):
    too_many = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 1501})
    assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "max_new_tokens"
    too_long = client.post("/generate", json={"prompt": "y" * 65, "max_new_tokens": 2})
    assert too_long.status_code == 422 and too_long.json()["error"]["param"] == "prompt"


def test_full_queue_is_429_with_retry_after_and_timeout_frees_the_slot(client, live):
    engine = live.engine
    outcomes = {}
    threads = [
        threading.Thread(target=lambda k=k: outcomes.__setitem__(k, client.post("/generate", json=LONG)))
        for k in ("first", "second")
    ]
    threads[0].start()
    wait_until(lambda: len(engine.batch.rows) == 1)
    threads[1].start()
    wait_until(lambda: engine.pending == 1)  # waits for the one batch slot
    refused = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "engine_busy"
    for thread in threads:
        thread.join(60)
    first = outcomes["first"]
    assert first.status_code == 503 and first.json()["error"]["code"] == "timeout"
    wait_until(lambda: not engine.batch.rows and engine.pending == 0)
    assert client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_a_client_that_hangs_up_frees_its_slot(client, live):
    engine = live.engine
    aborted = engine.scheduler.aborted
    # non-streamed: a raw socket that sends the request and closes
    body = httpx.Request("POST", f"{live.url}/generate", json=LONG)
    raw = (
        f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body.read())}\r\n\r\n"
    ).encode() + body.read()
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(raw)
        wait_until(lambda: len(engine.batch.rows) == 1)
    wait_until(lambda: engine.scheduler.aborted == aborted + 1, timeout=10)
    wait_until(lambda: not engine.batch.rows)

    # streamed: read a few events, then leave
    with client.stream("POST", "/generate", json={**LONG, "stream": True}) as response:
        for _ in zip(range(6), response.iter_lines()):
            pass
    wait_until(lambda: engine.scheduler.aborted == aborted + 2, timeout=10)
    reply = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_a_request_without_a_budget_fits_a_server_capped_below_the_default():
    from app.routes.generate import DEFAULT_MAX_NEW_TOKENS, GenerateRequest, sampling_params
    from core.settings import Settings

    low = Settings(_env_file=None, max_new_tokens=8)
    assert sampling_params(GenerateRequest(prompt="hi"), low).max_new_tokens == 8  # not a 422
    high = Settings(_env_file=None, max_new_tokens=1000)
    assert sampling_params(GenerateRequest(prompt="hi"), high).max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert sampling_params(GenerateRequest(prompt="hi", max_new_tokens=5), low).max_new_tokens == 5
