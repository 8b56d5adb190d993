"""Who is calling: a configured API key (core/keys.py) maps to a principal, an owner and a role.

``user`` keys see and touch only what their owner created; ``admin`` keys see everything. Auth is off only when
``BONE_AUTH_DISABLED=true`` on a loopback host: every caller is then the anonymous admin and records get no
owner. A loopback server with no keys configured is not open: it uses the local admin key (core/local_key.py).
What a principal may see and touch is core/access.py.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.keys import KeyEntry, Role, hash_key, parse_key_entry
from core.local_key import LOCAL_OWNER, ensure_local_key, local_key_path


class AuthConfigError(ValueError):
    """Settings that would serve without (or with broken) authentication; start-up refuses them."""


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
