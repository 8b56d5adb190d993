"""Every success response in /openapi.json describes its body: a JSON 200/201/202 is a model (properties or
items), never a free-form object (what a route declared ``-> dict`` gets). Bodies that are not JSON (event
streams, zip downloads) are allowed only where listed below, so a new one is a decision, not an accident."""

from __future__ import annotations

import pytest

from app.main import create_app
from core.settings import Settings

SUCCESS = ("200", "201", "202")
NOT_JSON = {  # (method, path, media type) whose body is a stream or a file, not a JSON document
    ("get", "/jobs/{job_id}/events", "text/event-stream"),
    ("post", "/generate", "text/event-stream"),
    ("post", "/v1/completions", "text/event-stream"),
    ("post", "/v1/chat/completions", "text/event-stream"),
    ("get", "/adapters/{name}/download", "application/zip"),
}


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    settings = Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("openapi") / "data")
    return create_app(settings).openapi()


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _described(schema: dict, node: dict) -> bool:
    node = _resolve(schema, node)
    if "properties" in node or "items" in node:
        return True
    variants = node.get("anyOf") or node.get("oneOf") or node.get("allOf")
    return bool(variants) and all(_described(schema, v) for v in variants)


def _success_bodies(schema: dict):
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status in SUCCESS:
                for media, content in operation["responses"].get(status, {}).get("content", {}).items():
                    yield method, path, status, media, content.get("schema", {})


def test_every_json_success_body_is_described(schema):
    loose = [
        f"{m.upper()} {p} {s}: {media}"
        for m, p, s, media, body in _success_bodies(schema)
        if media == "application/json" and not _described(schema, body)
    ]
    assert loose == [], "free-form JSON response bodies (give the route a response_model)"


def test_non_json_bodies_are_only_the_listed_streams_and_downloads(schema):
    found = {(m, p, media) for m, p, _, media, _ in _success_bodies(schema) if media != "application/json"}
    assert found == NOT_JSON  # both ways: a stale entry here is as wrong as an unlisted stream


def test_every_operation_documents_a_success_body(schema):
    bare = [
        f"{m.upper()} {p}"
        for p, ops in schema["paths"].items()
        for m, op in ops.items()
        if not any(op["responses"].get(s, {}).get("content") for s in SUCCESS)
    ]
    assert bare == []


def test_readyz_documents_its_not_ready_answer(schema):
    not_ready = schema["paths"]["/readyz"]["get"]["responses"]["503"]
    assert not_ready["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "model_not_ready" in not_ready["description"]


def test_error_statuses_are_the_ones_each_operation_can_answer(schema):
    from app.ratelimit import BUCKETS

    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            where = f"{method.upper()} {path}"
            # BodySizeLimit bounds every request's body, whatever the route.
            assert responses["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), where
            # Rate limits, the generation queue and the quotas sit on the BUCKETS routes only.
            assert ("429" in responses) == ((method.upper(), path) in BUCKETS), where
            # /v1 answers 400 instead; the probes take no input and tolerate query strings (app.query_params)
            assert ("422" in responses) != (path.startswith("/v1/") or path in ("/healthz", "/readyz")), where
