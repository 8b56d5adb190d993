"""The worker fleet: ``GET /workers`` (live workers: device, memory, queues, current job, heartbeat) and
``GET /queues`` (each queue's depth, running jobs and the workers serving it). See core/fleet.py."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import RedisDep, SettingsDep
from core.fleet import live_workers, queue_summary

router = APIRouter(tags=["fleet"])


@router.get("/workers")
def list_workers(conn: RedisDep) -> dict:
    return {"object": "list", "data": [{"object": "worker", **w} for w in live_workers(conn)], "has_more": False}


@router.get("/queues")
def list_queues(conn: RedisDep, settings: SettingsDep) -> dict:
    return {"object": "list", "data": queue_summary(conn, settings), "has_more": False}
