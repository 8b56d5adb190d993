"""API keys and who is calling: keys are minted once, stored only as sha256 hashes, and map to a principal
(an owner and a role).

A key is ``bsk-`` + 43 url-safe characters (256 random bits). Because keys are random, not passwords, a
plain sha256 is the right hash (as for GitHub or Stripe tokens): nothing to brute-force, one hash per
request. Settings hold ``owner:role:sha256hex`` entries (``BONE_API_KEYS``); the raw key is printed once by
``bone-server keys create`` and never stored.

``user`` keys see and touch only what their owner created; ``admin`` keys see everything. Auth is off only when
``BONE_AUTH_DISABLED=true`` on a loopback host: every caller is then the anonymous admin and records get no
owner. A loopback server with no keys configured is not open: it uses the local admin key (core/local_key.py).

This module also holds the owner-scoped views of the job store and the adapter registry that the API hands
to routes (``app.deps``): another owner's job or adapter answers exactly like a missing one (404), so ids
leak nothing, and routes get the rule without a line of their own.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.errors import Conflict, NotFound
from core.jobs import Job
from core.jobstore import JobStore, UnreadableRecord
from core.local_key import LOCAL_OWNER, ensure_local_key, local_key_path
from core.registry import AdapterInfo, AdapterRegistry

Role = Literal["admin", "user"]
ROLES: tuple[str, ...] = ("admin", "user")
KEY_PREFIX = "bsk-"
OWNER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
_OWNER = re.compile(OWNER_PATTERN)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AuthConfigError(ValueError):
    """Settings that would serve without (or with broken) authentication; start-up refuses them."""


# --- keys ---------------------------------------------------------------------------------------------------
def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    owner: str
    role: Role
    sha256: str

    def line(self) -> str:
        return f"{self.owner}:{self.role}:{self.sha256}"


def parse_key_entry(raw: Any) -> KeyEntry:
    """One configured key: ``"owner:role:sha256hex"`` or ``{"owner", "role", "sha256"}``."""
    if isinstance(raw, dict):
        owner, role, digest = raw.get("owner"), raw.get("role", "user"), raw.get("sha256")
    elif isinstance(raw, str):
        parts = raw.strip().split(":")
        if len(parts) != 3:
            raise ValueError(
                "each API key entry must be 'owner:role:sha256hex' (mint one with `bone-server keys create`)"
            )
        owner, role, digest = parts
    else:
        raise ValueError(f"an API key entry must be a string or an object, got {type(raw).__name__}")
    if not isinstance(owner, str) or not _OWNER.match(owner):
        raise ValueError(f"API key owner {owner!r} must match {OWNER_PATTERN}")
    if role not in ROLES:
        raise ValueError(f"API key role {role!r} must be 'admin' or 'user'")
    digest = digest.lower() if isinstance(digest, str) else digest
    if not isinstance(digest, str) or not _HEX64.match(digest):
        if isinstance(digest, str) and digest.startswith(KEY_PREFIX):
            raise ValueError("BONE_API_KEYS holds hashes, not keys: use the line `bone-server keys create` printed")
        raise ValueError("API key hash must be 64 hex characters (the sha256 of the key)")
    return KeyEntry(owner=owner, role=role, sha256=digest)


def parse_key_entries(value: Any) -> list[str]:
    """The ``api_keys`` setting from the environment (comma/whitespace separated, or a JSON list) or from
    code (a list), normalised to ``owner:role:sha256`` lines."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        items: Iterable[Any] = json.loads(text) if text.startswith("[") else re.split(r"[\s,]+", text)
    else:
        items = value
    entries = [parse_key_entry(item) for item in items if item not in ("", None)]
    hashes = [entry.sha256 for entry in entries]
    if len(set(hashes)) != len(hashes):
        raise ValueError("the same API key hash is listed twice")
    return [entry.line() for entry in entries]


# --- principals ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    owner: str | None  # None: the anonymous caller of a server without auth
    role: Role
    key_id: str | None = None  # the first 16 hex digits of the key's hash: names it in logs and rate limits

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def authenticated(self) -> bool:
        return self.key_id is not None

    def can_see(self, owner: str | None) -> bool:
        return self.is_admin or (owner is not None and owner == self.owner)


ANONYMOUS = Principal(owner=None, role="admin")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KeyRing:
    """The configured keys; ``enabled`` is False when the server runs without auth (loopback only)."""

    def __init__(self, entries: Iterable[KeyEntry], enabled: bool, local_key_file: Path | None = None) -> None:
        self._by_hash = {entry.sha256: entry for entry in entries}
        self.enabled = enabled
        self.local_key_file = local_key_file  # set when the only key is the data dir's local admin key

    @classmethod
    def from_settings(cls, settings: Any) -> KeyRing:
        """Raises AuthConfigError (one line, naming the setting) when the settings would expose an open API."""
        entries = [parse_key_entry(line) for line in settings.api_keys]
        loopback = is_loopback(settings.host)
        if settings.auth_disabled:
            if not loopback:
                raise AuthConfigError(
                    f"BONE_AUTH_DISABLED=true is allowed only on a loopback host, and BONE_HOST is "
                    f"{settings.host!r}: set API keys (bone-server keys create) instead"
                )
            return cls(entries, enabled=False)
        if not entries:
            if not loopback:
                raise AuthConfigError(
                    f"BONE_HOST={settings.host!r} is not loopback and BONE_API_KEYS is empty: refusing "
                    "to serve without authentication (mint a key with `bone-server keys create --owner NAME`)"
                )
            # Loopback, nothing configured: still not open (only BONE_AUTH_DISABLED says that), but usable at
            # once with the data dir's local admin key (core/local_key.py).
            key = ensure_local_key(settings.data_dir)
            return cls(
                [KeyEntry(LOCAL_OWNER, "admin", hash_key(key))],
                enabled=True,
                local_key_file=local_key_path(settings.data_dir),
            )
        return cls(entries, enabled=True)

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, key: str) -> Principal | None:
        digest = hash_key(key)
        entry = self._by_hash.get(digest)
        # The dict lookup is keyed by a hash of a 256-bit secret, so its timing reveals nothing usable; the
        # compare is belt and braces.
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            return None
        return Principal(owner=entry.owner, role=entry.role, key_id=digest[:16])


# --- owner-scoped views ----------------------------------------------------------------------------------------
class OwnedJobStore(JobStore):
    """A job store as ``principal`` sees it: new jobs get its owner; other owners' jobs are 404."""

    def __init__(self, store: JobStore, principal: Principal) -> None:
        super().__init__(store.conn)
        self.principal = principal

    def create(self, job: Job, *args: Any, **kwargs: Any) -> None:
        if job.owner is None:
            job.owner = self.principal.owner
        super().create(job, *args, **kwargs)

    def get(self, job_id: str) -> Job:
        try:
            job = super().get(job_id)
        except UnreadableRecord:  # only its owner (or an admin) may learn that it exists, unreadable or not
            if not self.principal.can_see(self.stored_owner(job_id)):
                raise NotFound(f"no job with id {job_id!r}", param="job_id") from None
            raise
        if not self.principal.can_see(job.owner):
            raise NotFound(f"no job with id {job_id!r}", param="job_id")  # word for word what a missing id answers
        return job

    def list(self, *, limit: int = 20, after: str | None = None, owner: str | None = None) -> tuple[list[Job], bool]:
        if after is not None:
            try:
                self.get(after)
            except NotFound:
                raise NotFound(f"no job with id {after!r}", param="after") from None
        if not self.principal.is_admin:
            owner = self.principal.owner
        return super().list(limit=limit, after=after, owner=owner)


def _owner_checked(name: str):
    def method(self: OwnedJobStore, job_id: str, *args: Any, **kwargs: Any) -> Any:
        self.get(job_id)  # 404 for another owner's job, before anything is read or written
        return getattr(JobStore, name)(self, job_id, *args, **kwargs)

    method.__name__ = name
    return method


# Every other per-job method the API may call goes through the ownership check first.
for _name in (
    "records",
    "update",
    "transition",
    "request_cancel",
    "cancel_requested",
    "events",
    "add_event",
    "checkpoints",
    "add_checkpoint",
    "heartbeat",
):
    if hasattr(JobStore, _name):
        setattr(OwnedJobStore, _name, _owner_checked(_name))


class OwnedRegistry(AdapterRegistry):
    """The registry as ``principal`` sees it: other owners' adapters are absent (404, never listed) and
    cannot be overwritten; what it publishes carries its owner."""

    def __init__(self, registry: AdapterRegistry, principal: Principal) -> None:
        self.root = registry.root  # same folder; nothing created
        self.principal = principal

    def get(self, name: str) -> AdapterInfo:
        info = super().get(name)
        if not self.principal.can_see(info.owner):
            raise NotFound(f"no adapter named {name!r}", param="adapter")
        return info

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except NotFound:
            return False
        return True

    def list(self) -> list[AdapterInfo]:
        return [info for info in super().list() if self.principal.can_see(info.owner)]

    def adapter_config(self, name: str) -> dict[str, Any]:
        self.get(name)
        return super().adapter_config(name)

    def delete(self, name: str) -> None:
        try:
            self.get(name)
        except NotFound:
            raise NotFound(f"no adapter named {name!r}", param="name") from None
        super().delete(name)

    # No may_replace: owner scoping decides what may be replaced, and a caller must not widen it.
    def publish(  # type: ignore[override]
        self, name: str, source_dir: Any, metadata: dict[str, Any], *, overwrite: bool = False
    ) -> AdapterInfo:
        check_name_free(self, name, self.principal)  # the common case, answered before any copying
        # ... and again atomically with the swap: another owner may take the name while we copy.
        return super().publish(
            name,
            source_dir,
            {"owner": self.principal.owner, **metadata},
            overwrite=overwrite,
            may_replace=lambda current: self.principal.can_see(current.owner),
        )


def may_publish_over(job_owner: str | None, job_id: str, current: AdapterInfo) -> bool:
    """What a training job may replace when it publishes: an adapter of its own owner (or one an earlier
    attempt of the same job published). Not another owner's, even for an admin's job: the job publishes as its
    owner, so replacing would silently move the name to them. With auth off every owner is None."""
    return current.owner == job_owner or current.job_id == job_id


def check_name_free(registry: Any, name: str, principal: Principal, *, for_job: bool = False) -> None:
    """Adapter names are one namespace: a name another owner holds is taken, whatever ``overwrite`` says.
    Admins may replace anyone's adapter directly, but a job (``for_job``) only its owner's: see may_publish_over."""
    if principal.is_admin and not for_job:
        return
    try:
        info = AdapterRegistry.get(registry, name)  # unscoped on purpose, also for an OwnedRegistry
    except NotFound:
        return
    taken = info.owner != principal.owner if for_job else not principal.can_see(info.owner)
    if taken:
        raise Conflict(
            f"adapter name {name!r} is already in use; choose another name", param="adapter_name", code="adapter_exists"
        )
