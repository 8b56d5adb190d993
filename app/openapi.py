"""The OpenAPI schema with this server's own bounds and its event streams written in: the limits come from
settings (BONE_MAX_R, BONE_MAX_NEW_TOKENS, ...), so the pydantic models cannot carry them; clients, generated
SDKs and the fuzz test then see exactly what the server accepts. Validation itself stays in the routes (same
numbers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from app.errors import error_responses, is_openai_path
from app.openapi_examples import add_request_examples
from app.ratelimit import BUCKETS
from core.settings import Settings


def _bounds(settings: Settings) -> list[tuple[str, str, dict[str, Any]]]:
    """(schema, property, keywords): ``maximum``/``maxItems``/``pattern`` set on the property (or each of
    its non-null ``anyOf`` members)."""
    tokens = {"maximum": settings.max_new_tokens}
    return [
        ("GenerateRequest", "max_new_tokens", tokens),
        ("CompletionRequest", "max_tokens", tokens),
        ("CompletionRequest", "max_completion_tokens", tokens),
        ("ChatRequest", "max_tokens", tokens),
        ("ChatRequest", "max_completion_tokens", tokens),
        ("BoneSpec", "r", {"maximum": settings.max_r}),
        ("TrainingSpec", "max_seq_length", {"maximum": settings.max_seq_length}),
        ("TrainingSpec", "epochs", {"maximum": settings.max_epochs}),
        ("TrainingSpec", "max_steps", {"maximum": settings.max_train_steps}),
        ("RecordsDataset", "records", {"maxItems": settings.max_inline_records}),
        # a prompt of more characters than its byte bound is refused whatever it holds (app.routes.generate)
        ("GenerateRequest", "prompt", {"maxLength": settings.max_prompt_bytes}),
    ]


# Operations that answer server-sent events when asked (``stream: true`` / ``?stream=true``).
STREAMING = (
    ("post", "/generate"),
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("get", "/jobs/{job_id}/events"),
)
# OpenAPI links: which later operations take a value from an earlier answer (the created job's id, the
# uploaded file's id, ...). Clients and generated SDKs read them as "what to call next"; schemathesis'
# stateful phase (tests/app/test_fuzz.py) follows them, so the deep routes are fuzzed with ids that exist.
# (producer method, producer path, status) -> [(link name, consumer method, consumer path, {param: expression})]
LINKS: dict[tuple[str, str, str], list[tuple[str, str, str, dict[str, str]]]] = {
    ("post", "/jobs", "202"): [
        ("GetJob", "get", "/jobs/{job_id}", {"job_id": "$response.body#/id"}),
        ("CancelJob", "post", "/jobs/{job_id}/cancel", {"job_id": "$response.body#/id"}),
        ("JobEvents", "get", "/jobs/{job_id}/events", {"job_id": "$response.body#/id"}),
        ("JobCheckpoints", "get", "/jobs/{job_id}/checkpoints", {"job_id": "$response.body#/id"}),
        ("JobAdapter", "get", "/adapters/{name}", {"name": "$response.body#/adapter_name"}),
    ],
    ("post", "/files", "201"): [
        ("GetFile", "get", "/files/{file_id}", {"file_id": "$response.body#/id"}),
        ("DeleteFile", "delete", "/files/{file_id}", {"file_id": "$response.body#/id"}),
    ],
    ("post", "/evals", "202"): [
        ("GetEval", "get", "/evals/{eval_id}", {"eval_id": "$response.body#/id"}),
        ("CancelEval", "post", "/evals/{eval_id}/cancel", {"eval_id": "$response.body#/id"}),
    ],
    ("post", "/adapters", "201"): [
        ("GetAdapter", "get", "/adapters/{name}", {"name": "$response.body#/name"}),
        ("DownloadAdapter", "get", "/adapters/{name}/download", {"name": "$response.body#/name"}),
        ("ComposeFromAdapter", "post", "/adapters/{name}/compose", {"name": "$response.body#/name"}),
        ("DeleteAdapter", "delete", "/adapters/{name}", {"name": "$response.body#/name"}),
    ],
    ("post", "/adapters/{name}/compose", "201"): [
        ("GetComposed", "get", "/adapters/{name}", {"name": "$response.body#/name"}),
        ("DeleteComposed", "delete", "/adapters/{name}", {"name": "$response.body#/name"}),
    ],
}


def _operation_ref(method: str, path: str) -> str:
    # JSON pointer to the operation: "/" inside a path segment is escaped as "~1" (RFC 6901).
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method


def _add_links(schema: dict[str, Any]) -> None:
    paths = schema.get("paths", {})
    for (method, path, status), links in LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue  # a link from a route that is gone: left out, so the schema stays valid (tests/app/test_fuzz.py)
        for name, to_method, to_path, parameters in links:
            if to_method in paths.get(to_path, {}):
                response.setdefault("links", {})[name] = {
                    "operationRef": _operation_ref(to_method, to_path),
                    "parameters": parameters,
                }


SSE_CONTENT = {
    "text/event-stream": {
        "schema": {
            "description": "server-sent events, each `data:` a JSON object "
            "(the error envelope on failure); `data: [DONE]` ends a generation"
        }
    }
}


# --- which error statuses an operation documents -------------------------------------------------------------
def _document_errors(schema: dict[str, Any]) -> None:
    """The routers declare the error envelope (app.main); this states per operation what the server really
    answers, from the same facts the middleware and dependencies act on:

    - 413 everywhere: BodySizeLimit bounds the body of every request, whatever its route;
    - 429 only where a request can be rate limited (app.ratelimit.BUCKETS: the per-key limits, the generation
      queue and the per-owner quotas all sit on those routes);
    - no 422 on /v1, which answers every invalid request with 400 (app.errors).
    """
    too_large = {
        "description": error_responses(413)[413]["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.setdefault("413", too_large)
            if is_openai_path(path):
                responses.pop("422", None)
            if (method.upper(), path) not in BUCKETS:
                responses.pop("429", None)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    default: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default()
        components = schema.get("components", {}).get("schemas", {})
        for name, prop, keywords in _bounds(settings):
            field = components.get(name, {}).get("properties", {}).get(prop)
            if field is None:
                continue  # a model that changed shape: the schema stays valid, just less precise
            targets = [m for m in field.get("anyOf", []) if m.get("type") != "null"] or [field]
            for target in targets:
                target.update(keywords)
        for method, path in STREAMING:
            ok = schema.get("paths", {}).get(path, {}).get(method, {}).get("responses", {}).get("200")
            if ok is not None:
                ok.setdefault("content", {}).update(SSE_CONTENT)
        _add_links(schema)
        _document_errors(schema)
        add_request_examples(schema, settings)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
