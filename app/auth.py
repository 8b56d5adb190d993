"""Who is calling, as a FastAPI dependency: ``Authorization: Bearer <key>`` → ``Principal``.

``create_app`` attaches ``guard`` to every router except the health probes; it authenticates the caller and,
on the expensive routes, spends one unit of the caller's rate limit (``app.ratelimit``). Routes never check
ownership themselves: ``app.deps`` hands them views scoped to the principal (``core.access``).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.ratelimit import bucket_for, get_rate_limiter
from core.auth import ANONYMOUS, KeyRing, Principal
from core.errors import Unauthorized

log = logging.getLogger(__name__)

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key minted by `bone-server keys create` (not needed on a loopback server "
    "that runs without keys).",
)


def get_keyring(request: Request) -> KeyRing:
    return request.app.state.keyring


async def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Principal:
    keyring = get_keyring(request)
    principal: Principal | None
    if not keyring.enabled:
        principal = ANONYMOUS
    elif credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
    else:
        principal = keyring.authenticate(credentials.credentials)
        if principal is None:
            raise Unauthorized("invalid API key", code="invalid_api_key")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def guard(request: Request, principal: PrincipalDep) -> None:
    """The dependency every protected router carries: authentication, then the per-key rate limit."""
    route = request.scope.get("route")
    bucket = bucket_for(request.method, getattr(route, "path", request.url.path))
    if bucket is None:
        return
    limiter = get_rate_limiter(request)
    await run_in_threadpool(limiter.hit, bucket, caller_key(request))


def caller_key(request: Request) -> str:
    """Who a request counts against (rate limits, its share of the generation queue): its API key, else,
    on a server without keys, its client address. Call after ``guard`` (which records the principal)."""
    principal = getattr(request.state, "principal", None)
    key_id = getattr(principal, "key_id", None)
    return key_id or (request.client.host if request.client else "unknown")
