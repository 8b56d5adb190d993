"""The OpenAPI schema with this server's own bounds and its event streams written in: the limits come from settings (BONE_MAX_R,
BONE_MAX_NEW_TOKENS, ...), so the pydantic models cannot carry them; clients, generated SDKs and the fuzz
test then see exactly what the server accepts. Validation itself stays in the routes (same numbers)."""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI

from core.jobs import ADAPTER_NAME_PATTERN
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
        ("RecordsDataset", "records", {"maxItems": settings.max_inline_records}),
        ("JobCreate", "adapter_name", {"pattern": ADAPTER_NAME_PATTERN}),
    ]


# Operations that answer server-sent events when asked (``stream: true`` / ``?stream=true``).
STREAMING = (("post", "/generate"), ("post", "/v1/completions"), ("post", "/v1/chat/completions"),
             ("get", "/jobs/{job_id}/events"))
SSE_CONTENT = {"text/event-stream": {"schema": {"description": "server-sent events, each `data:` a JSON object "
                                                 "(the error envelope on failure); `data: [DONE]` ends a generation"}}}


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
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
