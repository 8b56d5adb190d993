"""Request ids, HTTP metrics, /metrics and the /ui dashboard, attached to the app in one place."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders

from app.metrics import HttpMetricsMiddleware, install_redis_collector, metrics_response
from core.logs import request_id_var

STATIC_DIR = Path(__file__).parent / "static"


class RequestIdMiddleware:
    """Every log line of a request carries its id; clients may send their own as X-Request-ID. Plain ASGI,
    so the context variable is set in the task that runs the route (and copied into its threadpool calls)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = sent or uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)

        async def tag(message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, tag)
        finally:
            request_id_var.reset(token)


def install_observability(app: FastAPI) -> None:
    app.add_middleware(HttpMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)  # added last = outermost: ids cover everything inside
    install_redis_collector(lambda: getattr(app.state, "redis", None), lambda: app.state.settings.queue_name)

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return metrics_response()

    @app.get("/ui", include_in_schema=False)
    async def ui_root():
        return RedirectResponse("/ui/")

    app.mount("/ui/", StaticFiles(directory=STATIC_DIR, html=True), name="ui")
