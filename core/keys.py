"""What an API key is: ``bsk-`` + 43 url-safe characters (256 random bits), stored only as its sha256, and
configured as ``owner:role:sha256hex`` entries (``BONE_API_KEYS``); the raw key is printed once by
``bone-server keys create`` and never stored.

Because keys are random, not passwords, a plain sha256 is the right hash (as for GitHub or Stripe tokens):
nothing to brute-force, one hash per request.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["admin", "user"]
ROLES: tuple[str, ...] = ("admin", "user")
KEY_PREFIX = "bsk-"
OWNER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
_OWNER = re.compile(OWNER_PATTERN)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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
