"""Unknown query parameters are refused, not ignored: ``GET /adapters?limt=5`` would otherwise answer every
adapter, and the client would never learn that its filter was a typo.

``refuse_unknown_query`` is a dependency ``create_app`` puts on the native API routers. A route accepts exactly
the query parameters its operation in /openapi.json documents (FastAPI derives them from the route's signature
and its dependencies), so what the docs list and what the server takes cannot drift apart. An unknown one is a
422 in the error envelope with ``param`` naming it and code ``unknown_parameter``.

Left out on purpose (``create_app`` does not attach it there): the OpenAI-compatible ``/v1`` routes, whose
clients add query parameters of their own (the openai SDK's ``default_query`` / ``extra_query``; its Azure
client sends ``api-version`` on every call) and which ignore unknown body fields for the same reason; the health
probes (a probe that fails over a query string restarts a healthy server); and what is not an API route
(/docs, /openapi.json, /metrics, /ui).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute

from core.errors import InvalidRequest

UNKNOWN_PARAMETER = "unknown_parameter"
# Added to the 422's description of the routes that refuse (app.main).
REFUSAL_NOTE = "an unknown query parameter is refused too (code `unknown_parameter`, `param` names it)"


def declared_query_params(schema: dict, path: str, method: str) -> frozenset[str] | None:
    """The query parameter names ``schema`` (the app's OpenAPI document) gives the operation; None for one the
    schema does not document (nothing to hold it to: it is let through)."""
    operation = schema.get("paths", {}).get(path, {}).get(method.lower())
    if operation is None:
        return None
    return frozenset(p["name"] for p in operation.get("parameters", []) if p.get("in") == "query")


async def refuse_unknown_query(request: Request) -> None:
    if not request.query_params:
        return  # the common case costs one check
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _known(request, route)
    if known is None:
        return
    unknown = [name for name in dict.fromkeys(request.query_params.keys()) if name not in known]
    if unknown:
        takes = ", ".join(sorted(known)) if known else "none"
        raise InvalidRequest(
            f"unknown query parameter {unknown[0]!r} (this route takes: {takes})",
            param=unknown[0],
            code=UNKNOWN_PARAMETER,
        )


def warm_known_query_params(app: FastAPI) -> None:
    """Build the app's schema and every route's known query parameters before serving: done lazily, the first
    request with a query string built the whole OpenAPI document on the event loop (~200 ms on a small app),
    and every other request waited."""
    schema = app.openapi()
    known: dict[tuple[str, str], frozenset[str] | None] = {}
    for route in app.routes:
        if isinstance(route, APIRoute):
            for method in route.methods or ():
                known[(route.path_format, method)] = declared_query_params(schema, route.path_format, method)
    app.state.known_query_params = known


def _known(request: Request, route: APIRoute) -> frozenset[str] | None:
    # Once per (operation, app): from the app's cached schema, kept on the app's state (each app has its own
    # schema; the route objects are the routers', shared by every app built from them).
    state = request.app.state
    known: dict[tuple[str, str], frozenset[str] | None] | None = getattr(state, "known_query_params", None)
    if known is None:
        known = state.known_query_params = {}
    key = (route.path_format, request.method)
    if key not in known:
        known[key] = declared_query_params(request.app.openapi(), route.path_format, request.method)
    return known[key]
