"""The request-body examples in /openapi.json (app.openapi_examples) are calls this server accepts: each one is
posted to a live server, after publishing the adapters the examples name."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.main import create_app
from app.openapi_examples import EXAMPLE_ADAPTERS
from core.settings import Settings
from tests.app.conftest import publish_adapter

SCHEMA = create_app(Settings(_env_file=None)).openapi()
EXAMPLES = [
    (path, name)
    for path, operations in SCHEMA["paths"].items()
    for name in operations.get("post", {})
    .get("requestBody", {})
    .get("content", {})
    .get("application/json", {})
    .get("examples", {})
]
# Examples that name an uploaded file: no such id here (422 not_found naming it); with the id of a real upload of
# the README's chat sample in its place, accepted.
NAMES_A_FILE = {("/jobs", "uploaded_file")}
CHAT_SAMPLE = Path(__file__).parents[2] / "examples" / "chat.jsonl"


def test_the_json_body_operations_have_examples():
    documented = {path for path, _ in EXAMPLES}
    assert {"/jobs", "/evals", "/generate", "/v1/completions", "/v1/chat/completions"} <= documented
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path, name", EXAMPLES, ids=[f"{p} {n}" for p, n in EXAMPLES])
def test_each_documented_example_is_accepted(client, live, path, name):
    if path != "/jobs":  # the job examples train the adapters the others use
        for seed, adapter in enumerate(EXAMPLE_ADAPTERS):
            publish_adapter(live.settings, adapter, seed=seed)
    schema = client.get("/openapi.json").json()  # the live server's own, with its base model's name
    example = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"][name]
    assert example["summary"]
    reply = client.post(path.replace("{name}", "blend"), json=example["value"])
    if (path, name) in NAMES_A_FILE:
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"]["code"] == "not_found" and reply.json()["error"]["param"] == "dataset.file_id"
        uploaded = client.post("/files", files={"file": (CHAT_SAMPLE.name, CHAT_SAMPLE.read_bytes())}).json()
        value = example["value"]
        reply = client.post(path, json={**value, "dataset": {**value["dataset"], "file_id": uploaded["id"]}})
    assert 200 <= reply.status_code < 300, reply.text


def test_a_body_over_the_limit_is_answered_as_documented(client, live):
    too_big = b"x" * (live.settings.max_body_bytes + 1)
    for path in ("/v1/chat/completions", "/jobs", "/healthz"):
        method = "GET" if path == "/healthz" else "POST"
        reply = client.request(method, path, content=too_big, headers={"content-type": "application/json"})
        assert reply.status_code == 413, (path, reply.text)
        assert reply.json()["error"]["code"] == "payload_too_large"
        assert "413" in SCHEMA["paths"][path][method.lower()]["responses"], path
