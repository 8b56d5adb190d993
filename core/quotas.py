"""Per-owner quotas: what one user key's owner may hold at once, so no tenant can fill the queue, the disk or
the registry for the others.

- ``active_jobs``: queued + running jobs and evaluations (``BONE_MAX_ACTIVE_JOBS_PER_OWNER``), counted in a Redis
  set per owner that creation adds to and the final transition removes from (core/jobstore.py);
- ``file_bytes``: bytes of uploaded files (``BONE_MAX_FILE_BYTES_PER_OWNER``);
- ``adapters``: adapters in the registry (``BONE_MAX_ADAPTERS_PER_OWNER``).

A quota of 0 means no bound. Admin keys (the operator) and the anonymous caller of a server without auth are
not bound. Over a quota → 429 in the envelope, ``code: quota_exceeded`` and ``param: quota.<name>``.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from core.errors import ServiceError
from core.jobstore import PREFIX, active_key


class QuotaExceeded(ServiceError):
    # No Retry-After: waiting does not help, ending a job or deleting a file or adapter does.
    status, type, code = 429, "rate_limit_error", "quota_exceeded"

    def __init__(self, quota: str, setting: str, limit: int, what: str) -> None:
        super().__init__(f"quota {quota} exceeded: {what}; the limit per owner is {limit:,} ({setting})",
                         param=f"quota.{quota}")
        self.quota = quota


def bound(principal: Any, limit: int) -> bool:
    """Whether ``principal`` is held to a quota of ``limit``."""
    return limit > 0 and principal.owner is not None and not principal.is_admin


# --- queued + running jobs and evaluations ----------------------------------------------------------------------
def record_key(record_id: str) -> str:
    """The stored record of a job or evaluation id (RQ job ids are the same ids)."""
    return f"{PREFIX}eval:{record_id}" if record_id.startswith("eval-") else f"{PREFIX}job:{record_id}"


def _still_active(raw: bytes | None) -> bool:
    if raw is None:
        return False
    try:
        return json.loads(raw).get("status") in ("queued", "running")
    except (ValueError, AttributeError):
        return False


def reserve_active(conn: redis.Redis, principal: Any, record_id: str, limit: int) -> None:
    """Count ``record_id`` (about to be created) against its owner's active-jobs quota, or raise QuotaExceeded.
    Add first, then count: two concurrent requests can never both take the last slot. Members whose record is
    final or gone (a creation that failed half-way) are dropped before refusing."""
    if not bound(principal, limit):
        return
    key = active_key(principal.owner)
    pipe = conn.pipeline(transaction=True)
    pipe.sadd(key, record_id)
    pipe.scard(key)
    _, count = pipe.execute()
    if count <= limit:
        return
    members = [m.decode() for m in conn.smembers(key) if m.decode() != record_id]
    stale = [m for m, raw in zip(members, conn.mget([record_key(m) for m in members]) if members else [])
             if not _still_active(raw)]
    if stale:
        conn.srem(key, *stale)
    if conn.scard(key) <= limit:
        return
    conn.srem(key, record_id)
    raise QuotaExceeded("active_jobs", "BONE_MAX_ACTIVE_JOBS_PER_OWNER", limit,
                        f"{count - 1 - len(stale)} jobs and evaluations are queued or running")


def release_active(conn: redis.Redis, principal: Any, record_id: str) -> None:
    """Undo ``reserve_active`` for a record that was not created after all."""
    if principal.owner is not None:
        conn.srem(active_key(principal.owner), record_id)


# --- uploaded files ---------------------------------------------------------------------------------------------
def check_file_bytes(used: int, incoming: int, principal: Any, limit: int) -> None:
    if bound(principal, limit) and used + incoming > limit:
        raise QuotaExceeded("file_bytes", "BONE_MAX_FILE_BYTES_PER_OWNER", limit,
                            f"the owner's files hold {used:,} bytes and this upload has {incoming:,}")


# --- adapters -----------------------------------------------------------------------------------------------------
def check_adapter_count(registry: Any, principal: Any, name: str, limit: int) -> None:
    """Refuse a new adapter ``name`` when the owner already holds ``limit`` adapters (replacing one of their own
    adds nothing)."""
    if not bound(principal, limit):
        return
    from core.registry import AdapterRegistry

    owned = [info.name for info in AdapterRegistry.list(registry) if info.owner == principal.owner]
    if name not in owned and len(owned) >= limit:
        raise QuotaExceeded("adapters", "BONE_MAX_ADAPTERS_PER_OWNER", limit,
                            f"the owner holds {len(owned):,} adapters")
