"""The registry in a local directory: one folder per adapter.

A publish copies the files and ``metadata.json`` into a hidden staging folder, fsyncs them, then renames the
folder into place (one atomic rename on one filesystem), so a reader sees no adapter or a whole one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from core.storage.common import (CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, Check, MayReplace, _in_use, _raced,
                                 _taken, fsync_path)

PUBLISH_LOCK_FILE = ".publish.lock"  # a local registry's publish lock (flock); hidden, so never listed

# A root folder whose mtime is older than this is trusted to move on its next change (see listing_stamp).
LISTING_SETTLED_S = 2.0

# path of a metadata.json -> ((inode, mtime_ns, size), bytes); shared by every registry object of the process
_METADATA_CACHE: dict[Path, tuple[tuple[int, int, int], bytes]] = {}


class LocalStorage:
    """One folder per adapter: ``<root>/<name>/{adapter_config.json, adapter_model.safetensors, metadata.json}``."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def location(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        return (self.root / name / METADATA_FILE).is_file()

    def read_metadata(self, name: str) -> bytes:
        return (self.root / name / METADATA_FILE).read_bytes()

    def listing_stamp(self) -> tuple[int, int] | None:
        """A token that changes whenever an adapter appears, is replaced or goes: every one of those renames an
        entry of the root folder, which moves the folder's mtime. ``None`` while that mtime is recent: a second
        change within the filesystem's timestamp granularity (or a clock a little off, on network filesystems)
        could leave it unmoved, so a listing read then must not be cached (git's "racy clean" rule)."""
        st = os.stat(self.root)
        if time.time() - st.st_mtime < LISTING_SETTLED_S:
            return None
        return st.st_ino, st.st_mtime_ns

    def all_metadata(self) -> list[bytes]:
        # Listing 1,000 adapters must not read 1,000 files per request: each metadata file is re-read only when
        # its (inode, mtime, size) changes; a publish or overwrite writes a new file, so a new inode.
        found = []
        with os.scandir(self.root) as scan:
            names = sorted(entry.name for entry in scan if not entry.name.startswith("."))
        for name in names:
            path = self.root / name / METADATA_FILE
            try:
                st = os.stat(path)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                hit = _METADATA_CACHE.get(path)
                if hit is None or hit[0] != stamp:
                    hit = (stamp, path.read_bytes())
                    _METADATA_CACHE[path] = hit
            except OSError:
                _METADATA_CACHE.pop(path, None)
                continue
            found.append(hit[1])
        return found

    def read_config(self, name: str) -> dict[str, Any]:
        return json.loads((self.root / name / CONFIG_FILE).read_text())

    def weights(self, name: str, sha256: str, check: Check) -> Path:
        path = self.root / name / WEIGHTS_FILE
        check(path, str(path))
        return path

    def commit(self, name: str, source_dir: Path, metadata_json: str, overwrite: bool,
               may_replace: MayReplace | None = None) -> None:
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for filename in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(source_dir / filename, staging / filename)
            (staging / METADATA_FILE).write_text(metadata_json)
            for child in staging.iterdir():
                fsync_path(child)
            fsync_path(staging)
            with self._publish_lock():
                if may_replace is not None and overwrite:
                    try:
                        current = self.read_metadata(name)
                    except FileNotFoundError:
                        current = None
                    if current is not None and not may_replace(current):
                        raise _in_use(name)
                self._swap_into_place(name, staging, overwrite)
            fsync_path(self.root)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    @contextlib.contextmanager
    def _publish_lock(self) -> Iterator[None]:
        """One publisher at a time per registry folder (all processes on this host): the check of what an
        overwrite replaces and the swap happen as one step. Held for two renames, not for the copy."""
        with open(self.root / PUBLISH_LOCK_FILE, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _swap_into_place(self, name: str, staging: Path, overwrite: bool) -> None:
        target, trash = self.root / name, None
        if target.exists():
            if not overwrite:
                raise _taken(name)
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            os.rename(target, trash)
        try:
            os.rename(staging, target)  # fails (ENOTEMPTY) if another publisher won the race
        except OSError:
            if trash is not None:
                os.rename(trash, target)
            raise _raced(name) from None
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def remove(self, name: str) -> bool:
        if not self.has(name):
            return False
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.rename(self.root / name, trash)  # disappears from listings at once; the files go after
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def sweep(self) -> int:
        removed = 0
        for entry in self.root.iterdir():
            if entry.name.startswith((".staging-", ".trash-")):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
