"""Liveness and readiness probes."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app.deps import EngineDep, RedisDep
from core.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process answers: always 200 (restart it only when this fails)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(conn: RedisDep, engine: EngineDep) -> dict:
    """Ready to take traffic: Redis answers a ping and the base model is loaded and served."""
    try:
        await run_in_threadpool(conn.ping)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ServiceUnavailable(f"Redis unreachable: {exc}", code="redis_unavailable") from None
    if not engine.ready:
        raise ServiceUnavailable("the base model is not loaded", code="model_not_ready")
    return {"status": "ready", "base_model": engine.base.name, "device": str(engine.base.device)}
