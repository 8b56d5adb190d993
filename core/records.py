"""Records the workers run (jobs, evaluations) in Redis: one JSON record per id, a listing index, per-owner
indexes, inline dataset rows kept apart, a cancel flag, and atomic status transitions.

Keys (all under ``bone:``), for a record kind ``k`` (``job``, ``eval``) and its index ``ks`` (``jobs``, ``evals``):
  k:{id}                the record as JSON
  ks                    sorted set of ids by creation time (listing, cursor pagination)
  ks:owner:{owner}      the same, one owner's only: a user's listing reads only their own records
  owner:{owner}:active  sorted set of the owner's queued and running job and evaluation ids, by when they were
                        reserved (the active-jobs quota, core/quotas.py)
  k:{id}:records        inline dataset rows (kept apart so listings stay small); deleted when the record ends
  k:{id}:validation_records  inline validation rows; both get a TTL when stored (BONE_INLINE_RECORDS_TTL_S),
                        so no path leaves them behind
  k:{id}:cancel         cooperative-cancel flag the task polls. A separate key on purpose: RQ's ``save_meta()``
                        rewrites the whole meta field, so a flag kept in ``job.meta`` is lost
                        (shared/reference/rq-redis-notes.md).
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

import redis
from pydantic import ValidationError
from redis.client import Pipeline
from typing_extensions import Self

from core.errors import Conflict, NotFound, ServiceError
from core.jobs import STORED, JobStatus

PREFIX = "bone:"
INLINE_RECORDS_TTL_S = 7 * 24 * 3600  # default of BONE_INLINE_RECORDS_TTL_S
CANCEL_FLAG_TTL_S = 7 * 24 * 3600

log = logging.getLogger(__name__)


class StoredRecord(Protocol):
    """What a stored record is: a pydantic model with these fields (``core.jobs.Job``, ``core.evals.Evaluation``)."""

    id: str
    owner: str | None
    status: JobStatus
    created_at: float

    @classmethod
    def model_validate(cls, obj: Any, *, strict: bool | None = None, context: Any | None = None) -> Self: ...

    @classmethod
    def model_validate_json(
        cls, json_data: str | bytes | bytearray, *, strict: bool | None = None, context: Any | None = None
    ) -> Self: ...

    def model_dump(self) -> dict[str, Any]: ...

    def model_dump_json(self) -> str: ...


R = TypeVar("R", bound=StoredRecord)


class UnreadableRecord(ServiceError):
    code = "unreadable_record"


def owner_index(index: str, owner: str) -> str:
    return f"{index}:owner:{owner}"


def active_key(owner: str) -> str:
    return f"{PREFIX}owner:{owner}:active"


def non_final(allowed_from: Iterable[JobStatus] | None) -> set[JobStatus]:
    return set(allowed_from) if allowed_from is not None else {s for s in JobStatus if not s.is_final}


_indexed: set[str] = set()  # indexes whose per-owner copies this process has checked (see _ensure_owner_index)
_indexed_lock = threading.Lock()


class RecordStore(Generic[R]):
    """The records of one kind. ``what`` names the kind in messages ("job"), ``param`` the id's parameter."""

    def __init__(self, conn: redis.Redis, model: type[R], *, kind: str, what: str, param: str) -> None:
        self.conn = conn
        self.model = model
        self.kind = kind
        self.what = what
        self.param = param
        self.index = f"{PREFIX}{kind}s"

    def key(self, record_id: str) -> str:
        return f"{PREFIX}{self.kind}:{record_id}"

    def not_found(self, record_id: str, param: str | None = None) -> NotFound:
        """What a missing id answers, word for word (and what an owner-scoped view answers for a hidden one)."""
        return NotFound(f"no {self.what} with id {record_id!r}", param=param or self.param)

    # --- create / read ----------------------------------------------------------------------------------
    def create(
        self,
        record: R,
        records: builtins.list[dict[str, Any]] | None = None,
        validation_records: builtins.list[dict[str, Any]] | None = None,
        *,
        pipeline: Pipeline | None = None,
        records_ttl_s: int = INLINE_RECORDS_TTL_S,
    ) -> None:
        """Store a new record. With ``pipeline`` the writes join it and the caller executes it (the API queues a
        job for RQ in the same MULTI/EXEC: stored and queued, or neither). Inline rows expire after
        ``records_ttl_s`` even if the record never ends (they are deleted when it does)."""
        pipe = pipeline if pipeline is not None else self.conn.pipeline(transaction=True)
        key = self.key(record.id)
        pipe.set(key, record.model_dump_json())
        if records is not None:
            pipe.set(key + ":records", json.dumps(records), ex=records_ttl_s)
        if validation_records is not None:
            pipe.set(key + ":validation_records", json.dumps(validation_records), ex=records_ttl_s)
        pipe.zadd(self.index, {record.id: record.created_at})
        if record.owner is not None:
            pipe.zadd(owner_index(self.index, record.owner), {record.id: record.created_at})
            pipe.zadd(active_key(record.owner), {record.id: record.created_at}, nx=True)  # nx: the quota's time
        self.on_create(pipe, record)
        if pipeline is None:
            pipe.execute()

    def on_create(self, pipe: Pipeline, record: R) -> None:
        """What a kind writes besides the record, in the same transaction."""

    def get(self, record_id: str) -> R:
        raw = self.conn.get(self.key(record_id))
        if raw is None:
            raise self.not_found(record_id)
        try:
            return self.model.model_validate_json(raw, context=STORED)
        except ValidationError as exc:
            log.error("%s %s: stored record no longer validates: %s", self.what, record_id, exc)
            raise UnreadableRecord(f"{self.what} {record_id} has a stored record this server cannot read") from None

    def stored_owner(self, record_id: str) -> str | None:
        """The owner named in a stored record, read without validating the rest of it."""
        raw = self.conn.get(self.key(record_id))
        try:
            owner = json.loads(raw).get("owner") if raw is not None else None
        except (ValueError, AttributeError):
            return None
        return owner if isinstance(owner, str) else None

    def records(self, record_id: str, which: str = "records") -> builtins.list[dict[str, Any]] | None:
        """Inline rows: ``which`` is "records" or "validation_records"."""
        raw = self.conn.get(self.key(record_id) + ":" + which)
        return None if raw is None else json.loads(raw)

    def list(
        self, *, limit: int = 20, after: str | None = None, owner: str | None = None
    ) -> tuple[builtins.list[R], bool]:
        """One page, newest first, optionally only ``owner``'s (read from that owner's own index: another
        owner's records are never even fetched). ``after`` is the last id of the previous page. A record that
        no longer validates (written by an older version, or damaged) is skipped and logged: one bad record
        must not take the listing down for everyone. Returns (records, has_more)."""
        index = self.index
        if owner is not None:
            self._ensure_owner_index()
            index = owner_index(index, owner)
        start = 0
        if after is not None:
            rank = self.conn.zrevrank(index, after)
            if rank is None:
                raise self.not_found(after, param="after")
            start = rank + 1
        found: builtins.list[R] = []
        # Records may be missing or skipped, so read in chunks until the page is full.
        while len(found) <= limit:
            ids = self.conn.zrevrange(index, start, start + limit)
            if not ids:
                break
            start += len(ids)
            for record_id, raw in zip(ids, self.conn.mget([self.key(i.decode()) for i in ids])):
                if raw is None:
                    continue
                try:
                    record = self.model.model_validate_json(raw, context=STORED)
                except ValidationError as exc:
                    log.warning(
                        "skipping %s %s in a listing: its record no longer validates (%d errors, first: %s)",
                        self.what,
                        record_id.decode(),
                        exc.error_count(),
                        exc.errors()[0].get("msg"),
                    )
                    continue
                if owner is None or record.owner == owner:
                    found.append(record)
        return found[:limit], len(found) > limit

    def _ensure_owner_index(self) -> None:
        """Records stored before per-owner indexes existed get indexed once (a marker key says it is done)."""
        with _indexed_lock:
            if self.index in _indexed:
                return
            marker = self.index + ":owner_index_v1"
            if not self.conn.exists(marker):
                entries = [(i.decode(), score) for i, score in self.conn.zrange(self.index, 0, -1, withscores=True)]
                for chunk in range(0, len(entries), 500):
                    part = entries[chunk : chunk + 500]
                    pipe = self.conn.pipeline(transaction=False)
                    for (record_id, score), raw in zip(part, self.conn.mget([self.key(i) for i, _ in part])):
                        try:
                            owner = json.loads(raw).get("owner") if raw is not None else None
                        except (ValueError, AttributeError):
                            owner = None
                        if isinstance(owner, str) and owner:
                            pipe.zadd(owner_index(self.index, owner), {record_id: score})
                    pipe.execute()
                self.conn.set(marker, "1")
            _indexed.add(self.index)

    # --- updates --------------------------------------------------------------------------------------
    def transition(self, record_id: str, allowed_from: Iterable[JobStatus] | None = None, **fields: Any) -> R:
        """Atomically update (WATCH/MULTI), only from ``allowed_from`` states (default: any non-final)."""
        return self.transition_checked(record_id, allowed_from, fields)

    def transition_checked(
        self,
        record_id: str,
        allowed_from: Iterable[JobStatus] | None,
        fields: dict[str, Any],
        *,
        check: Callable[[R], None] | None = None,
        finish: Callable[[R], R] | None = None,
    ) -> R:
        """Move the record to ``fields``: WATCH it, refuse unless its status is in ``allowed_from`` (and ``check``
        passes), MULTI-write the updated record (``finish`` may adjust it) with what ``on_transition`` adds,
        and start over if someone else wrote it meanwhile."""
        allowed = non_final(allowed_from)
        key = self.key(record_id)
        with self.conn.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise self.not_found(record_id)
                    before = self.model.model_validate_json(raw, context=STORED)
                    if before.status not in allowed:
                        raise Conflict(
                            f"{self.what} {record_id} is {before.status.value}", param=self.param, code="invalid_state"
                        )
                    if check is not None:
                        check(before)
                    after = self.model.model_validate({**before.model_dump(), **fields}, context=STORED)
                    if finish is not None:
                        after = finish(after)
                    pipe.multi()
                    pipe.set(key, after.model_dump_json())
                    if after.status.is_final and not before.status.is_final:
                        # Nothing reads its inline rows again, and it no longer counts against the active quota.
                        pipe.delete(key + ":records", key + ":validation_records")
                        if after.owner is not None:
                            pipe.zrem(active_key(after.owner), after.id)
                    self.on_transition(pipe, before, after)
                    pipe.execute()
                    return after
                except redis.WatchError:
                    continue

    def on_transition(self, pipe: Pipeline, before: R, after: R) -> None:
        """What a kind writes besides the record when it changes, in the same transaction."""

    # --- cancel ---------------------------------------------------------------------------------------
    def request_cancel(self, record_id: str) -> None:
        self.conn.set(self.key(record_id) + ":cancel", "1", ex=CANCEL_FLAG_TTL_S)

    def cancel_requested(self, record_id: str) -> bool:
        return bool(self.conn.exists(self.key(record_id) + ":cancel"))
