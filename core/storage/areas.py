"""Hidden areas of the registry's store (names starting with ".", so the adapter listing and the registry's
sweep never see them): the resume checkpoints (``resume_state``) and the uploaded files (``core.files``).

``FolderArea`` serves a registry folder (local or shared, e.g. NFS), ``ObjectArea`` one under an fsspec URL;
both answer the same few calls with keys relative to the area. Atomic single writes: a rename in a folder,
one PUT on object storage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from core.storage.common import fsync_path
from core.storage.objects import ObjectStorage


def files_below(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative name, path) of every file below ``folder``."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            yield path.relative_to(folder).as_posix(), path


def _place(source: Path, target: Path) -> None:
    """``target`` gets ``source``'s bytes, atomically: a hard link where both share a filesystem (checkpoint
    files are never changed in place), else a copy into a temporary name and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".part-{uuid.uuid4().hex}")
    try:
        try:
            os.link(source, part)
        except OSError:
            shutil.copyfile(source, part)
            fsync_path(part)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


class FolderArea:
    """A hidden area of a local (or shared, e.g. NFS) registry folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def write_atomic(self, key: str, data: bytes) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".part-{uuid.uuid4().hex}")
        try:
            part.write_bytes(data)
            fsync_path(part)
            os.replace(part, target)
            fsync_path(target.parent)
        finally:
            part.unlink(missing_ok=True)

    def put_file(self, path: Path, key: str) -> None:
        _place(path, self.root / key)
        fsync_path((self.root / key).parent)

    def put_folder(self, folder: Path, key: str) -> None:
        target = self.root / key
        for name, path in files_below(folder):
            _place(path, target / name)
        for sub in sorted({p.parent for p in target.rglob("*")} | {target}, reverse=True):
            fsync_path(sub)  # the new names are durable before the manifest that names them

    def get_file(self, key: str, target: Path) -> None:
        _place(self.root / key, target)

    def children(self, key: str) -> list[str]:
        try:
            return sorted(entry.name for entry in (self.root / key).iterdir())
        except FileNotFoundError:
            return []

    def age_s(self, key: str) -> float:
        """Seconds since the newest file below ``key`` (or ``key`` itself) was written."""
        path = self.root / key
        stamps = [p.stat().st_mtime for p in path.rglob("*")] if path.is_dir() else []
        return time.time() - max([path.stat().st_mtime, *stamps])

    def remove(self, key: str) -> None:
        path = self.root / key
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class ObjectArea:
    """A hidden area (``<prefix>/...``) of an object-storage registry (any fsspec URL): a PUT of one object is
    atomic."""

    def __init__(self, storage: ObjectStorage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return self.storage._key(self.prefix, key)

    def read(self, key: str) -> bytes:
        with self.storage._reachable():
            return self.storage.fs.cat_file(self._key(key))

    def write_atomic(self, key: str, data: bytes) -> None:
        with self.storage._reachable():
            self.storage.fs.pipe_file(self._key(key), data)

    def put_file(self, path: Path, key: str) -> None:
        with self.storage._reachable():
            self.storage.fs.put_file(str(path), self._key(key))

    def put_folder(self, folder: Path, key: str) -> None:
        with self.storage._reachable():
            for name, path in files_below(folder):
                self.storage.fs.put_file(str(path), self._key(f"{key}/{name}"))

    def get_file(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".part-{uuid.uuid4().hex}")
        try:
            with self.storage._reachable():
                self.storage.fs.get_file(self._key(key), str(part))
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)

    def children(self, key: str) -> list[str]:
        """Names directly below ``key`` that hold objects (from the object listing: some stores, SeaweedFS
        among them, keep listing a "folder" whose objects are all deleted)."""
        base = self._key(key).rstrip("/") + "/"
        with self.storage._reachable():
            try:
                keys = self.storage.fs.find(base)
            except FileNotFoundError:
                return []
        return sorted({k[len(base) :].split("/", 1)[0] for k in keys if k.startswith(base)} - {""})

    def age_s(self, key: str) -> float:
        """Seconds since the newest object below ``key`` was written (0 when the store gives no dates)."""
        with self.storage._reachable():
            found = self.storage.fs.find(self._key(key), detail=True)
        stamps = [info["LastModified"].timestamp() for info in found.values() if "LastModified" in info]
        if not stamps:
            raise FileNotFoundError(key)
        return time.time() - max(stamps)

    def remove(self, key: str) -> None:
        with self.storage._reachable(), contextlib.suppress(FileNotFoundError):
            self.storage.fs.rm(self._key(key), recursive=True)
