"""Per-owner quotas: what one user key's owner may hold at once, so no tenant can fill the queue, the disk or
the registry for the others.

- ``active_jobs``: queued + running jobs and evaluations (``BONE_MAX_ACTIVE_JOBS_PER_OWNER``), counted in a Redis
  set per owner that creation adds to and the final transition removes from (core/records.py);
- ``file_bytes``: bytes of uploaded files (``BONE_MAX_FILE_BYTES_PER_OWNER``);
- ``adapters``: adapters in the registry (``BONE_MAX_ADAPTERS_PER_OWNER``).

A quota of 0 means no bound. Admin keys (the operator) and the anonymous caller of a server without auth are
not bound. Over a quota → 429 in the envelope, ``code: quota_exceeded`` and ``param: quota.<name>``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from core.errors import ServiceError
from core.records import PREFIX, active_key


class QuotaExceeded(ServiceError):
    # No Retry-After: waiting does not help, ending a job or deleting a file or adapter does.
    status, type, code = 429, "rate_limit_error", "quota_exceeded"

    def __init__(self, quota: str, setting: str, limit: int, what: str) -> None:
        super().__init__(
            f"quota {quota} exceeded: {what}; the limit per owner is {limit:,} ({setting})", param=f"quota.{quota}"
        )
        self.quota = quota


RESERVATION_GRACE_S = 60.0  # a reservation whose record is still missing after this was a failed creation


def bound(principal: Any, limit: int) -> bool:
    """Whether ``principal`` is held to a quota of ``limit``."""
    return limit > 0 and principal.owner is not None and not principal.is_admin


# --- queued + running jobs and evaluations ----------------------------------------------------------------------
def record_key(record_id: str) -> str:
    """The stored record of a job or evaluation id (RQ job ids are the same ids)."""
    return f"{PREFIX}eval:{record_id}" if record_id.startswith("eval-") else f"{PREFIX}job:{record_id}"


def _ended(raw: bytes | None) -> bool:
    if raw is None:
        return True
    try:
        return json.loads(raw).get("status") not in ("queued", "running")
    except (ValueError, AttributeError, TypeError):
        return True


def reserve_active(conn: redis.Redis, principal: Any, record_id: str, limit: int) -> None:
    """Count ``record_id`` (about to be created) against its owner's active-jobs quota, or raise QuotaExceeded.

    A request passes only when one MULTI that adds it also counts at most ``limit`` entries, itself included;
    entries leave only when their record ends or their request is refused. So concurrent requests can never
    pass the quota together. Before refusing, entries that no longer hold a slot are dropped and the count is
    taken once more: a record that ended, or a reservation older than RESERVATION_GRACE_S whose record was never
    written (its creation failed half-way); a younger one without a record is a creation in flight."""
    if not bound(principal, limit):
        return
    key = active_key(principal.owner)
    if _add_and_count(conn, key, record_id) <= limit:
        return
    conn.zrem(key, record_id)
    now = time.time()
    entries = [(m.decode(), score) for m, score in conn.zrange(key, 0, -1, withscores=True)]
    raws = conn.mget([record_key(m) for m, _ in entries]) if entries else []
    stale = [
        m
        for (m, score), raw in zip(entries, raws)
        if (raw is None and now - score > RESERVATION_GRACE_S) or (raw is not None and _ended(raw))
    ]
    if stale:
        conn.zrem(key, *stale)
    count = _add_and_count(conn, key, record_id)
    if count <= limit:
        return
    conn.zrem(key, record_id)
    raise QuotaExceeded(
        "active_jobs",
        "BONE_MAX_ACTIVE_JOBS_PER_OWNER",
        limit,
        f"{count - 1} jobs and evaluations are queued or running",
    )


def _add_and_count(conn: redis.Redis, key: str, record_id: str) -> int:
    pipe = conn.pipeline(transaction=True)
    pipe.zadd(key, {record_id: time.time()})
    pipe.zcard(key)
    return pipe.execute()[1]


def release_active(conn: redis.Redis, principal: Any, record_id: str) -> None:
    """Undo ``reserve_active`` for a record that was not created after all."""
    if principal.owner is not None:
        conn.zrem(active_key(principal.owner), record_id)


# --- uploaded files ---------------------------------------------------------------------------------------------
def check_file_bytes(used: int, incoming: int, principal: Any, limit: int) -> None:
    if bound(principal, limit) and used + incoming > limit:
        raise QuotaExceeded(
            "file_bytes",
            "BONE_MAX_FILE_BYTES_PER_OWNER",
            limit,
            f"the owner's files hold {used:,} bytes and this upload has {incoming:,}",
        )


# --- adapters -----------------------------------------------------------------------------------------------------
def check_adapter_count(registry: Any, principal: Any, name: str, limit: int) -> None:
    """Refuse a new adapter ``name`` when the owner already holds ``limit`` adapters (replacing one of their own
    adds nothing). ``registry`` may be the whole registry or the owner's view of it (core.access)."""
    if not bound(principal, limit):
        return
    owned = [info.name for info in registry.list() if info.owner == principal.owner]
    if name not in owned and len(owned) >= limit:
        raise QuotaExceeded(
            "adapters", "BONE_MAX_ADAPTERS_PER_OWNER", limit, f"the owner holds {len(owned):,} adapters"
        )
