"""Unknown query parameters (app.query_params) over a live server: refused by name on every native operation,
let through where clients add their own (/v1, the health probes) and on what is not an API route."""

from __future__ import annotations

import re

import openai
import pytest

from app.main import create_app
from core.settings import Settings

SCHEMA = create_app(Settings(_env_file=None)).openapi()
NATIVE = [
    (method.upper(), path)
    for path, operations in SCHEMA["paths"].items()
    for method in operations
    if not path.startswith("/v1") and path not in ("/healthz", "/readyz")
]


def _url(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "does-not-exist", path)


def test_a_typo_in_a_filter_is_refused_naming_it(client):
    reply = client.get("/adapters", params={"limt": 5})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == "limt" and error["code"] == "unknown_parameter"
    assert error["type"] == "invalid_request_error"
    assert "'limt'" in error["message"] and "after, limit" in error["message"]  # what the route does take


@pytest.mark.parametrize("method, path", NATIVE, ids=[f"{m} {p}" for m, p in NATIVE])
def test_every_native_operation_refuses_an_unknown_parameter(client, method, path):
    # Refused before the body is read or the id looked up: the parameter is named, not the missing body or id.
    reply = client.request(method, _url(path), params={"bogus": "1"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == "bogus"


def test_declared_parameters_and_repeats_pass(client):
    assert client.get("/jobs", params={"limit": 2}).status_code == 200
    assert client.get("/adapters", params=[("limit", "1"), ("limit", "2"), ("after", "a")]).status_code == 200
    assert client.get("/files").status_code == 200  # no parameters at all
    # A known parameter next to an unknown one: the unknown one is named.
    reply = client.get("/evals", params={"limit": 1, "afterr": "x"})
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "afterr"


def test_openai_routes_and_probes_tolerate_extra_parameters(client, live):
    # The openai SDK sends whatever default_query / extra_query hold (its Azure client: api-version on every call).
    with openai.OpenAI(
        base_url=f"{live.url}/v1", api_key="unused", max_retries=0, default_query={"api-version": "2024-06-01"}
    ) as api:
        models = api.models.list()
        assert models.data[0].id == live.settings.base_model
        reply = api.completions.create(model=live.settings.base_model, prompt="hi", max_tokens=2, temperature=0)
        assert reply.choices[0].finish_reason in ("length", "stop")
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/ui/"):
        assert client.get(path, params={"probe": "1"}).status_code == 200, path


def test_the_schema_says_which_operations_refuse():
    for path, operations in SCHEMA["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path.startswith("/v1"):  # 400 for every invalid request
                assert "422" not in responses and "400" in responses, (method, path)
            elif (method.upper(), path) in NATIVE:
                assert "unknown_parameter" in responses["422"]["description"], (method, path)


def test_the_command_line_lists_files_within_its_limit(client, live):
    # `files list --limit` used to send ?limit= to GET /files, which takes none: ignored then, refused now.
    from typer.testing import CliRunner

    from cli.main import cli

    for i in range(2):
        assert client.post("/files", files={"file": (f"rows{i}.jsonl", b'{"text": "a row"}\n')}).status_code == 201
    result = CliRunner().invoke(cli, ["files", "list", "--limit", "1", "--url", live.url], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "rows" in line and ".jsonl" in line]
    assert len(rows) == 1 and "rows1.jsonl" in rows[0], result.output  # the newest, alone


def test_every_operations_parameters_are_known_before_the_first_request(live):
    # Built lazily, the table cost the first request with a query string a whole OpenAPI build on the event loop
    # (~200 ms during which no tenant was answered); start-up builds it in a thread instead.
    known = live.app.state.known_query_params
    for method, path in NATIVE:
        assert (path, method) in known, (method, path)
    assert known[("/jobs/{job_id}/events", "GET")] == {"after", "limit", "stream"}
