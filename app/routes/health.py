"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any, Literal

import redis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from app.deps import EngineDep, RedisDep
from app.errors import ErrorResponse
from core.errors import ServiceUnavailable

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class SupervisedWorker(BaseModel):
    state: Literal["starting", "running", "restarting", "stopped"]
    pid: int | None
    restarts: int = Field(description="times it exited and was started again")
    last_exit: str | None = Field(description="how it last ended, e.g. 'killed by SIGKILL'")


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    base_model: str = Field(description="the base model served, as configured (BONE_BASE_MODEL)")
    device: str = Field(description="where it runs, e.g. cpu or cuda:0")
    worker: SupervisedWorker | None = Field(
        None,
        description="`bone-server up` only: the worker it keeps alive "
        "(restarted with backoff when it exits); the API stays ready meanwhile",
    )


# Not ready is an answer of this probe, not a failure: say which codes a load balancer will see.
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorResponse,
        "description": "Not ready: Redis does not answer (code "
        "`redis_unavailable`) or the base model is not loaded (code `model_not_ready`)",
    }
}


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process answers: always 200 (restart it only when this fails)."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses=NOT_READY)
async def readyz(request: Request, conn: RedisDep, engine: EngineDep) -> Readiness:
    """Ready to take traffic: Redis answers a ping and the base model is loaded and served."""
    try:
        await run_in_threadpool(conn.ping)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ServiceUnavailable(f"Redis unreachable: {exc}", code="redis_unavailable") from None
    if not engine.ready:
        raise ServiceUnavailable("the base model is not loaded", code="model_not_ready")
    supervisor = getattr(request.app.state, "worker_supervisor", None)
    worker = SupervisedWorker(**supervisor.status()) if supervisor is not None else None
    return Readiness(base_model=engine.base.name, device=str(engine.base.device), worker=worker)
