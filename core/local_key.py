"""The local admin key: what a loopback server with no configured keys uses instead of running open.

Auth may be off only when the settings say so (``BONE_AUTH_DISABLED=true``, loopback only). A fresh
``bone-server up`` on embedded defaults still has to work, so, like Jupyter's token, the server mints one admin
key on first start and keeps it in the data dir, readable by its user only. ``up`` prints where it is; the CLI
client reads it when it talks to a loopback server and no key was given. Configuring ``BONE_API_KEYS`` replaces
it (the file is then ignored).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from core.keys import generate_key

LOCAL_KEY_FILE = "local-admin.key"
LOCAL_OWNER = "local"


def local_key_path(data_dir: Path) -> Path:
    return Path(data_dir) / LOCAL_KEY_FILE


def read_local_key(data_dir: Path) -> str | None:
    try:
        key = local_key_path(data_dir).read_text().strip()
    except OSError:
        return None
    return key or None


def ensure_local_key(data_dir: Path) -> str:
    """The data dir's local admin key, minted on first use. Several processes starting at once on one data dir
    agree: the key is written whole to a private temporary file, then linked into place, which fails if another
    process linked theirs first (then theirs is the key). No reader ever sees a half-written file."""
    path = local_key_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".local-admin-", dir=path.parent)  # mode 0600
    try:
        key = generate_key()
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            existing = read_local_key(data_dir)
            if existing is None:
                raise RuntimeError(f"{path} holds no key: delete it to mint a new one") from None
            return existing
        return key
    finally:
        os.unlink(temporary)
