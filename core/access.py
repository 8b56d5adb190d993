"""Owner scoping, the one rule: a principal sees and touches only what its owner created (``Principal.can_see``:
admins see everything), and another owner's thing answers exactly like a missing one (404, same words), so ids
and names leak nothing. What a principal creates carries its owner.

The API hands routes these views instead of the stores (``app.deps``); each holds the store it scopes and
checks before it delegates, so routes get the rule without a line of their own. The stores themselves stay
unscoped: workers, the janitor and quotas read them whole.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Generic

from core.auth import Principal
from core.errors import Conflict, InvalidRequest, NotFound
from core.files import FileInfo, FileStore
from core.jobs import Job, JobStatus
from core.jobstore import JobStore
from core.records import R, RecordStore, UnreadableRecord
from core.registry import AdapterInfo, AdapterRegistry


# --- jobs and evaluations ---------------------------------------------------------------------------------
class OwnedRecords(Generic[R]):
    """A record store as ``principal`` sees it: new records get its owner; other owners' records are 404."""

    def __init__(self, store: RecordStore[R], principal: Principal) -> None:
        self.store = store
        self.principal = principal

    def create(self, record: R, *args: Any, **kwargs: Any) -> None:
        if record.owner is None:
            record.owner = self.principal.owner
        self.store.create(record, *args, **kwargs)

    def get(self, record_id: str, *, param: str | None = None) -> R:
        try:
            record = self.store.get(record_id)
        except UnreadableRecord:  # only its owner (or an admin) may learn that it exists, unreadable or not
            if not self.principal.can_see(self.store.stored_owner(record_id)):
                raise self.store.not_found(record_id, param) from None
            raise
        except NotFound:
            raise self.store.not_found(record_id, param) from None
        if not self.principal.can_see(record.owner):
            raise self.store.not_found(record_id, param)
        return record

    def list(self, *, limit: int = 20, after: str | None = None) -> tuple[builtins.list[R], bool]:
        """The principal's records (an admin's: everyone's), newest first. Returns (records, has_more)."""
        if after is not None:
            self.get(after, param="after")
        owner = None if self.principal.is_admin else self.principal.owner
        return self.store.list(limit=limit, after=after, owner=owner)

    # Every other per-record method checks first: 404 for another owner's record before anything is read or written.
    def records(self, record_id: str, which: str = "records") -> builtins.list[dict[str, Any]] | None:
        self.get(record_id)
        return self.store.records(record_id, which)

    def transition(self, record_id: str, allowed_from: Iterable[JobStatus] | None = None, **fields: Any) -> R:
        self.get(record_id)
        return self.store.transition(record_id, allowed_from, **fields)

    def request_cancel(self, record_id: str) -> None:
        self.get(record_id)
        self.store.request_cancel(record_id)

    def cancel_requested(self, record_id: str) -> bool:
        self.get(record_id)
        return self.store.cancel_requested(record_id)


class OwnedJobs(OwnedRecords[Job]):
    """The job store as ``principal`` sees it (see OwnedRecords), with the job-only methods checked the same way."""

    store: JobStore

    def __init__(self, store: JobStore, principal: Principal) -> None:
        super().__init__(store, principal)

    def update(self, job_id: str, **fields: Any) -> Job:
        self.get(job_id)
        return self.store.update(job_id, **fields)

    def events(self, job_id: str, **kwargs: Any) -> builtins.list[dict[str, Any]]:
        self.get(job_id)
        return self.store.events(job_id, **kwargs)

    def add_event(self, job_id: str, kind: str, message: str = "", **data: Any) -> str:
        self.get(job_id)
        return self.store.add_event(job_id, kind, message, **data)

    def checkpoints(self, job_id: str) -> builtins.list[dict[str, Any]]:
        self.get(job_id)
        return self.store.checkpoints(job_id)

    def heartbeat(self, job_id: str) -> int | None:
        self.get(job_id)
        return self.store.heartbeat(job_id)


# --- adapters -----------------------------------------------------------------------------------------------
class OwnedAdapters:
    """The registry as ``principal`` sees it: other owners' adapters are absent (404, never listed) and cannot
    be overwritten; what it publishes carries its owner. ``registry`` is the unscoped one."""

    def __init__(self, registry: AdapterRegistry, principal: Principal) -> None:
        self.registry = registry
        self.principal = principal

    def _visible(self, info: AdapterInfo, param: str = "adapter") -> AdapterInfo:
        if not self.principal.can_see(info.owner):
            raise NotFound(f"no adapter named {info.name!r}", param=param)
        return info

    def get(self, name: str) -> AdapterInfo:
        return self._visible(self.registry.get(name))

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except NotFound:
            return False
        return True

    def list(self) -> builtins.list[AdapterInfo]:
        return [info for info in self.registry.list() if self.principal.can_see(info.owner)]

    def adapter_config(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self.registry.adapter_config(name)

    def verified_tensors(self, name: str) -> tuple[dict[str, Any], AdapterInfo]:
        self.get(name)  # before reading a byte: another owner's adapter, damaged or not, is simply absent
        tensors, info = self.registry.verified_tensors(name)
        return tensors, self._visible(info)  # the version read, should the name have changed hands meanwhile

    def delete(self, name: str) -> None:
        try:
            self.get(name)
        except NotFound:
            raise NotFound(f"no adapter named {name!r}", param="name") from None
        self.registry.delete(name)

    def publish(self, name: str, source_dir: Path, metadata: dict[str, Any], *, overwrite: bool = False) -> AdapterInfo:
        """Publish as the principal's owner. Owner scoping decides what may be replaced: there is no
        ``may_replace`` for a caller to widen it."""
        self.check_name_free(name)  # the common case, answered before any copying
        # ... and again atomically with the swap: another owner may take the name while we copy. An admin may
        # replace anyone's adapter, so there is nothing to judge.
        judge = None if self.principal.is_admin else (lambda current: self.principal.can_see(current.owner))
        return self.registry.publish(
            name, source_dir, {"owner": self.principal.owner, **metadata}, overwrite=overwrite, may_replace=judge
        )

    def check_name_free(self, name: str, *, for_job: bool = False) -> None:
        """Adapter names are one namespace: a name another owner holds is taken, whatever ``overwrite`` says.
        Admins may replace anyone's adapter directly, but a job (``for_job``) only its owner's: see
        may_publish_over."""
        if self.principal.is_admin and not for_job:
            return
        try:
            info = self.registry.get(name)
        except NotFound:
            return
        taken = info.owner != self.principal.owner if for_job else not self.principal.can_see(info.owner)
        if taken:
            raise Conflict(
                f"adapter name {name!r} is already in use; choose another name",
                param="adapter_name",
                code="adapter_exists",
            )


def may_publish_over(job_owner: str | None, job_id: str, current: AdapterInfo) -> bool:
    """What a training job may replace when it publishes: an adapter of its own owner (or one an earlier
    attempt of the same job published). Not another owner's, even for an admin's job: the job publishes as its
    owner, so replacing would silently move the name to them. With auth off every owner is None."""
    return current.owner == job_owner or current.job_id == job_id


# What reads adapters takes either: the whole registry (the server's own tasks, e.g. the vLLM folder sync) or
# one caller's view of it (the routes).
Adapters = AdapterRegistry | OwnedAdapters


# --- uploaded files -------------------------------------------------------------------------------------------
class OwnedFiles:
    """The file store as ``principal`` sees it: other owners' files are 404 and never listed; uploads carry
    its owner."""

    def __init__(self, store: FileStore, principal: Principal) -> None:
        self.store = store
        self.principal = principal

    def get(self, file_id: str) -> FileInfo:
        info = self.store.get(file_id)
        if not self.principal.can_see(info.owner):
            raise NotFound(f"no file with id {file_id!r}", param="file_id")
        return info

    def list(self) -> builtins.list[FileInfo]:
        return [info for info in self.store.list() if self.principal.can_see(info.owner)]

    def save(self, source: BinaryIO, filename: str, **kwargs: Any) -> FileInfo:
        return self.store.save(source, filename, owner=self.principal.owner, **kwargs)

    def delete(self, file_id: str) -> FileInfo:
        self.get(file_id)
        return self.store.delete(file_id)

    def check_usable(self, file_id: str, param: str) -> None:
        """A job or an evaluation may read only its owner's uploads: another owner's file answers as a missing
        one (400, ``not_found``). A file that does not exist passes: the dataset checks report it."""
        try:
            info = self.store.get(file_id)
        except NotFound:
            return
        if not self.principal.can_see(info.owner):
            raise InvalidRequest(f"no file with id {file_id!r}", param=param, code="not_found")
