"""Request ids, HTTP metrics, /metrics and the /ui dashboard, attached to the app in one place."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request

from app.metrics import http_metrics_middleware, install_redis_collector, metrics_response
from core.logs import request_id_var

STATIC_DIR = Path(__file__).parent / "static"


async def request_id_middleware(request: Request, call_next):
    """Every log line of a request carries its id; clients may send their own as X-Request-ID."""
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
    token = request_id_var.set(request_id)
    try:
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        return response
    finally:
        request_id_var.reset(token)


def install_observability(app: FastAPI) -> None:
    app.middleware("http")(http_metrics_middleware)
    app.middleware("http")(request_id_middleware)
    install_redis_collector(lambda: getattr(app.state, "redis", None),
                            lambda: app.state.settings.queue_name)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return metrics_response()

    @app.get("/ui", include_in_schema=False)
    async def ui_root():
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
