"""The edge where errors become HTTP responses: every failure leaves as one envelope, OpenAI's

    {"error": {"message": "...", "type": "...", "param": "field.path" | null, "code": "..."}}

Everything below the routes raises ``core.errors.ServiceError`` (or lets a library error through); only this
module knows status codes. Nothing returns a traceback to a client: unexpected errors are logged here and
answered with a generic 500 envelope.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import InvalidRequest, PayloadTooLarge, RateLimited, ServiceError, ServiceUnavailable, Unauthorized
from core.paths import redact_server_paths

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("not_found", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
}


# --- the envelope in OpenAPI ------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, not_found, conflict, rate_limit_error, "
        "service_unavailable or server_error; on /v1 OpenAI's: invalid_request_error (400, "
        "404, 409, 413), authentication_error, permission_error, rate_limit_error, server_error"
    )
    param: str | None = Field(description="the dotted path of the field at fault, when one is")
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "Malformed request (e.g. a broken multipart body); on the OpenAI routes (/v1) every invalid request",
    401: "Missing or invalid API key",
    404: "No such resource (another owner's ids answer the same)",
    409: "Conflict with the current state",
    413: "Request body or upload too large",
    422: "Validation error naming the field (`param`); the OpenAI routes (/v1) answer 400 instead",
    429: "Rate limit or generation queue full (see Retry-After), or a per-owner quota (code quota_exceeded)",
    500: "Unexpected server error (details in the server log, never in the response)",
    503: "A dependency (Redis, the model) is unavailable; retry",
}


def error_responses(*statuses: int, notes: dict[int, str] | None = None) -> dict[int | str, dict]:
    """``responses=`` for a router or route: each status documented with the error envelope (``notes``: more
    to say about a status on these routes)."""
    notes = notes or {}
    return {
        status: {
            "model": ErrorResponse,
            "description": "; ".join(filter(None, (_ERROR_DESCRIPTIONS[status], notes.get(status)))),
        }
        for status in (statuses or tuple(_ERROR_DESCRIPTIONS))
    }


# --- the OpenAI-compatible routes speak OpenAI's table ----------------------------------------------------
OPENAI_PREFIX = "/v1/"
# OpenAI (and vLLM) answer every invalid request with 400, so its SDKs raise ``BadRequestError``; the native
# routes keep 422 for validation. Types as OpenAI's API and SDKs use them; ``code`` stays ours (e.g.
# ``model_not_found`` on a 404).
_OPENAI_STATUS = {422: 400}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX) or path == OPENAI_PREFIX.rstrip("/")


def openai_status_and_type(status: int, type_: str) -> tuple[int, str]:
    """What a ``/v1`` route answers for an error the service reports as (status, type)."""
    status = _OPENAI_STATUS.get(status, status)
    return status, _OPENAI_TYPES.get(status, type_)


def envelope(
    status: int,
    message: str,
    type_: str,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "",
) -> JSONResponse:
    if is_openai_path(path):
        status, type_ = openai_status_and_type(status, type_)
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: ServiceError, path: str = "") -> JSONResponse:
    headers = None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    body, status = exc.to_dict(), exc.status  # to_dict: some errors carry more (an upload's bad rows)
    if is_openai_path(path):
        status, body["error"]["type"] = openai_status_and_type(status, exc.type)
    return JSONResponse(body, status_code=status, headers=headers)


def service_error_from(exc: BaseException) -> ServiceError | None:
    """Translate the library errors that have a meaning for clients; None for genuine bugs."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return ServiceUnavailable(f"Redis unreachable: {exc}", code="redis_unavailable")
    try:
        from bone.errors import BoneConfigError
    except ImportError:  # pragma: no cover - bone is part of this distribution
        return None
    if isinstance(exc, BoneConfigError):
        field = getattr(exc, "field", None)
        return InvalidRequest(str(exc), param=f"bone.{field}" if field else "bone", code="invalid_bone_config")
    return None


# --- validation errors -----------------------------------------------------------------------------------
_PRIMITIVE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "bytes"}


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the union member's name into ``loc`` ('RecordsDataset', 'list[str]', 'str'); a field never
    looks like that."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or part in _PRIMITIVE_TAGS)


def _field_path(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if not _is_union_tag(p)]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


def summarize_validation_errors(errors: list[dict]) -> tuple[str | None, str, str]:
    """(param, message, code) for the most useful error of a pydantic error list.

    A union of strict models (a dataset is exactly one of four shapes) yields one error group per member.
    The member the client meant is the one with no missing or extra keys; if none qualifies the client
    matched no shape at all, and saying so beats listing every member's complaints.
    """
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    tag_at = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
    if tag_at is None:
        return _field_path(loc), _message(first), _code(first)
    prefix = loc[:tag_at]
    groups: dict[Any, list[dict]] = {}
    for err in errors:
        err_loc = tuple(err.get("loc", ()))
        if err_loc[:tag_at] == prefix and len(err_loc) > tag_at:
            groups.setdefault(err_loc[tag_at], []).append(err)
    shape_misses = {tag: sum(e["type"] in ("missing", "extra_forbidden") for e in errs) for tag, errs in groups.items()}
    fitting = [tag for tag, misses in shape_misses.items() if misses == 0]
    param = _field_path(prefix)
    if len(fitting) == 1 or (fitting and all(tag[:1].isupper() for tag in fitting)):
        err = groups[fitting[0]][0]
        return _field_path(tuple(err["loc"])), _message(err), _code(err)
    if all(isinstance(tag, str) and tag[:1].isupper() for tag in groups):
        shapes = "; ".join(_describe_model_tag(tag, groups[tag]) for tag in groups)
        return param, f"{param} must match exactly one of these shapes: {shapes}", "invalid_value"
    messages = list(dict.fromkeys(e["msg"] for errs in groups.values() for e in errs))
    return param, f"{param}: " + " or ".join(messages), "invalid_value"


def _code(err: dict) -> str:
    return {"missing": "missing_field", "extra_forbidden": "unknown_field", "json_invalid": "invalid_json"}.get(
        str(err.get("type")), "invalid_value"
    )


def _describe_model_tag(tag: str, errs: list[dict]) -> str:
    required = [str(e["loc"][-1]) for e in errs if e["type"] == "missing"]
    return "{" + ", ".join(f'"{key}"' for key in required) + "}" if required else tag


def _message(err: dict) -> str:
    path = _field_path(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {path!r}"
    return f"{path}: {err['msg']}" if path else f"request body: {err['msg']}"


# --- handlers ------------------------------------------------------------------------------------------
def _without_server_paths(request: Request, exc: ServiceError) -> ServiceError:
    """Messages leave the server without its absolute paths (names relative to the data dir instead)."""
    settings = getattr(request.app.state, "settings", None)
    if settings is not None:
        exc.message = redact_server_paths(exc.message, settings.data_dir)
    return exc


async def _on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(_without_server_paths(request, exc), request.url.path)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if not errors:
        return envelope(422, "invalid request", "invalid_request_error", "invalid_value", path=request.url.path)
    param, message, code = summarize_validation_errors(errors)
    if errors[0].get("type") == "json_invalid":
        param = None  # loc holds a character offset, not a field
    return envelope(422, message, "invalid_request_error", code, param, path=request.url.path)


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_, code = _HTTP_TYPES.get(
        exc.status_code,
        ("invalid_request_error" if exc.status_code < 500 else "server_error", f"http_{exc.status_code}"),
    )
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    return envelope(
        exc.status_code,
        message,
        type_,
        code,
        param=getattr(exc, "param", None),
        headers=getattr(exc, "headers", None),
        path=request.url.path,
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    translated = service_error_from(exc)
    if translated is not None:
        if translated.status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, translated.status, translated.message)
        return error_response(_without_server_paths(request, translated), request.url.path)
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return envelope(
        500,
        "internal server error; the server log has the details",
        "server_error",
        "internal_error",
        path=request.url.path,
    )


# Starlette types every handler as taking ``Exception``; each here takes the class it is registered for.
def _handler(function: Callable[[Request, Any], Awaitable[JSONResponse]]) -> Callable[[Request, Exception], Any]:
    return function


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _handler(_on_service_error))
    app.add_exception_handler(RequestValidationError, _handler(_on_validation_error))
    app.add_exception_handler(StarletteHTTPException, _handler(_on_http_exception))
    # Library errors with a client meaning get their own entries so they are handled inside the
    # exception middleware (the catch-all ``Exception`` handler runs in the outermost middleware).
    for exc_type in (redis.ConnectionError, redis.TimeoutError):
        app.add_exception_handler(exc_type, _on_unexpected)
    try:
        from bone.errors import BoneConfigError

        app.add_exception_handler(BoneConfigError, _on_unexpected)
    except ImportError:  # pragma: no cover
        pass
    app.add_exception_handler(Exception, _on_unexpected)


# --- body size -----------------------------------------------------------------------------------------
class _BodyTooLarge(StarletteHTTPException):
    """A 413 met while the body streams in; ``param`` (read by ``_on_http_exception``) names the field that
    made the body large."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(413, message)
        self.param = param


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, before they are read (Content-Length) or while
    they stream in (chunked uploads), so a huge body never lands in memory."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        upload_paths: tuple[str, ...] = (),
        max_upload_bytes: int | None = None,
        path_limits: dict[str, tuple[int, str, str]] | None = None,
    ) -> None:
        self.app, self.max_bytes = app, max_bytes
        # Multipart uploads (training files, adapter imports) get their own, larger bound.
        self.upload_paths, self.max_upload_bytes = frozenset(upload_paths), max_upload_bytes or max_bytes
        # POST routes whose valid bodies are known to be smaller (generation: one prompt's worth), refused
        # before a byte is parsed: path -> (limit, the settings it derives from, the field that makes it large).
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "").rstrip("/")
        upload = scope.get("method") == "POST" and path in self.upload_paths
        limit, setting = (
            (self.max_upload_bytes, "BONE_MAX_UPLOAD_BYTES") if upload else (self.max_bytes, "BONE_MAX_BODY_BYTES")
        )
        param = None
        if scope.get("method") == "POST" and path in self.path_limits:
            limit, setting, param = self.path_limits[path]
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(self._too_large(limit, setting, param))
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the route's body read: FastAPI re-raises HTTPExceptions untouched.
                    raise _BodyTooLarge(self._too_large(limit, setting, param).message, param)
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    def _too_large(limit: int, setting: str, param: str | None = None) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds {limit} bytes ({setting})", param=param)
