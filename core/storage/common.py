"""What both registry backends share: the file names of an adapter, the callbacks ``core.registry`` passes in,
the conflicts a publish can raise, and ``fsync_path``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from core.errors import Conflict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "metadata.json"

# What the server writes is readable by its own user and group only (BONE_UMASK narrows it further).
FILE_MODE = 0o640
FOLDER_MODE = 0o750

# check(path, label): raises CorruptAdapter when the file at `path` does not hash to the manifest's sha256.
Check = Callable[[Path, str], None]

# check_bytes(data, label): the same for weights already read into memory (hashed, then loaded, from these bytes).
CheckBytes = Callable[[bytes, str], None]

# ``commit(..., may_replace=)``: given the metadata (JSON bytes) of the adapter an overwrite would replace, may it?
# Checked under the same lock (local) or compare-and-swap (object storage) as the replacement itself, so an
# owner check cannot be raced by another owner publishing the name in between.
MayReplace = Callable[[bytes], bool]


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _taken(name: str) -> Conflict:
    return Conflict(
        f"adapter {name!r} already exists; pass overwrite=true to replace it",
        param="adapter_name",
        code="adapter_exists",
    )


def _in_use(name: str) -> Conflict:
    return Conflict(
        f"adapter name {name!r} is already in use; choose another name", param="adapter_name", code="adapter_exists"
    )


def _raced(name: str) -> Conflict:
    return Conflict(f"adapter {name!r} was published concurrently", param="adapter_name", code="adapter_exists")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
