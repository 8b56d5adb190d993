"""Security headers on every response, and a Content-Security-Policy on the dashboard (``/ui``).

The dashboard is static files with no inline script or style, so a strict policy costs it nothing: scripts,
styles and API calls from this origin only, no framing (clickjacking), no plugins. ``/docs`` is left without
a CSP: FastAPI's Swagger page loads its scripts from a CDN and runs an inline one.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UI_PREFIX = "/ui"

DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

EVERY_RESPONSE = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dashboard = scope.get("path", "").startswith(UI_PREFIX)

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in EVERY_RESPONSE.items():
                    headers.setdefault(name, value)
                if dashboard:
                    headers["Content-Security-Policy"] = DASHBOARD_CSP
            await send(message)

        await self.app(scope, receive, add_headers)
