"""The registry in a local directory: one folder per adapter.

A publish copies the files and ``metadata.json`` into a hidden staging folder, fsyncs them, then renames the
folder into place (one atomic rename on one filesystem), so a reader sees no adapter or a whole one.

An overwrite exchanges the staging folder with the live one in one step where the kernel and filesystem can
(Linux ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs), so a reader sees the old version or the new
one, never neither. Elsewhere it takes two renames (the old folder aside to ``.trash-*``, then the staging
folder into place); before the first one the publisher writes a journal (``.swap-<name>.json``, naming both
folders), and whoever next takes the publish lock for that name (a publish, a delete, the sweep every API
start runs) finishes the swap of a publisher that died between the renames: forward when the new folder is
whole, else back.

The sweep deletes leftovers (``.staging-*``, ``.trash-*``) only under the publish lock, only once they are
older than a grace period, and never a staging folder a live publisher still holds (a shared flock on it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.storage.common import (
    CONFIG_FILE,
    FILE_MODE,
    FOLDER_MODE,
    METADATA_FILE,
    WEIGHTS_FILE,
    Check,
    CheckBytes,
    MayReplace,
    _in_use,
    _raced,
    _taken,
    fsync_path,
)

log = logging.getLogger(__name__)

PUBLISH_LOCK_FILE = ".publish.lock"  # a local registry's publish lock (flock); hidden, so never listed
STAGING_PREFIX, TRASH_PREFIX, JOURNAL_PREFIX = ".staging-", ".trash-", ".swap-"

# A root folder whose mtime is older than this is trusted to move on its next change (see listing_stamp).
LISTING_SETTLED_S = 2.0
# Staging and trash folders younger than this are left alone by the sweep (BONE_REGISTRY_SWEEP_GRACE_S).
SWEEP_GRACE_S = 3600.0

# path of a metadata.json -> ((inode, mtime_ns, size), bytes); shared by every registry object of the process
_METADATA_CACHE: dict[Path, tuple[tuple[int, int, int], bytes]] = {}


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (``renameat2(RENAME_EXCHANGE)``); False where the platform or filesystem
    cannot, so the caller falls back to two journaled renames."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _leftover_name(prefix: str) -> str:
    # Milliseconds in the name: the sweep reads a leftover's age from it (a renamed folder keeps its old mtime).
    return f"{prefix}{int(time.time() * 1000):013d}-{uuid.uuid4().hex}"


def _leftover_age_s(entry: Path) -> float:
    """Seconds since the leftover was made (from its name), or since it last changed, whichever is less."""
    ages = []
    stamp = entry.name.split("-", 2)[1] if entry.name.count("-") >= 2 else ""
    if stamp.isdigit() and len(stamp) == 13:
        ages.append(time.time() - int(stamp) / 1000)
    with contextlib.suppress(FileNotFoundError):
        ages.append(time.time() - entry.stat().st_mtime)
    return min(ages) if ages else 0.0


def _abandoned(folder: Path) -> bool:
    """No live publisher holds this folder (its flock goes when the process dies)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


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

    def label(self, name: str) -> str:
        """How errors name the weights: relative to the registry, never a server path."""
        return f"{name}/{WEIGHTS_FILE}"

    def weights(self, name: str, sha256: str, check: Check) -> Path:
        path = self.root / name / WEIGHTS_FILE
        check(path, self.label(name))
        return path

    def read_weights(self, name: str, sha256: str, check: CheckBytes) -> bytes:
        """The weights file read once and checked: the caller loads these very bytes, so a file changed after
        the check cannot be what is loaded."""
        data = (self.root / name / WEIGHTS_FILE).read_bytes()
        check(data, self.label(name))
        return data

    # --- write ---------------------------------------------------------------------------------------
    def commit(
        self, name: str, source_dir: Path, metadata_json: str, overwrite: bool, may_replace: MayReplace | None = None
    ) -> None:
        with self._new_staging() as staging:
            for filename in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(source_dir / filename, staging / filename)
            (staging / METADATA_FILE).write_text(metadata_json)
            for child in staging.iterdir():
                os.chmod(child, FILE_MODE)
                fsync_path(child)
            fsync_path(staging)
            with self._publish_lock():
                self._recover(name)
                if may_replace is not None and overwrite:
                    try:
                        current = self.read_metadata(name)
                    except FileNotFoundError:
                        current = None
                    if current is not None and not may_replace(current):
                        raise _in_use(name)
                self._swap_into_place(name, staging, overwrite)
            fsync_path(self.root)

    @contextlib.contextmanager
    def _new_staging(self) -> Iterator[Path]:
        """A fresh staging folder with a shared flock on it from birth (made under the publish lock, which the
        sweep holds, so the sweep never sees it unheld) until the publish ends; then removed unless it went
        into place."""
        staging = self.root / _leftover_name(STAGING_PREFIX)
        with self._publish_lock():
            staging.mkdir(mode=FOLDER_MODE)
            fd = os.open(staging, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            yield staging
        finally:
            os.close(fd)
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

    def _journal(self, name: str) -> Path:
        return self.root / f"{JOURNAL_PREFIX}{name}.json"

    def _swap_into_place(self, name: str, staging: Path, overwrite: bool) -> None:
        target = self.root / name
        if not target.exists():
            try:
                os.rename(staging, target)  # fails (ENOTEMPTY) if another publisher won the race
            except OSError:
                raise _raced(name) from None
            return
        if not overwrite:
            raise _taken(name)
        if _exchange(staging, target):  # one atomic step: the staging name now holds the old version
            fsync_path(self.root)
            shutil.rmtree(staging, ignore_errors=True)
            return
        trash, journal = self.root / _leftover_name(TRASH_PREFIX), self._journal(name)
        # The journal is durable before the first rename: a publisher that dies between the two leaves enough
        # for _recover to finish its swap.
        part = journal.with_name(journal.name + ".part")
        part.write_text(json.dumps({"staging": staging.name, "trash": trash.name}))
        fsync_path(part)
        os.replace(part, journal)
        fsync_path(self.root)
        os.rename(target, trash)
        os.rename(staging, target)
        fsync_path(self.root)
        journal.unlink()
        shutil.rmtree(trash, ignore_errors=True)

    def _recover(self, name: str) -> str | None:
        """Finish the swap of a publisher that died between its two renames (call under the publish lock).
        Returns "forward", "back" or None (nothing to do)."""
        journal = self._journal(name)
        try:
            plan = json.loads(journal.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            plan = {}  # torn before its fsync: the first rename never happened
        target = self.root / name
        staging = self.root / str(plan.get("staging", ""))
        trash = self.root / str(plan.get("trash", ""))
        outcome = None
        if not target.exists() and plan:
            if (staging / METADATA_FILE).is_file():
                os.rename(staging, target)  # the new version was whole (fsynced before the journal)
                outcome = "forward"
            elif (trash / METADATA_FILE).is_file():
                os.rename(trash, target)
                outcome = "back"
        fsync_path(self.root)
        journal.unlink()
        if outcome:
            log.warning("registry: finished an interrupted overwrite of %r (rolled %s)", name, outcome)
        if plan and trash.name.startswith(TRASH_PREFIX) and trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        return outcome

    def remove(self, name: str) -> bool:
        with self._publish_lock():
            self._recover(name)
            if not self.has(name):
                return False
            trash = self.root / _leftover_name(TRASH_PREFIX)
            os.rename(self.root / name, trash)  # disappears from listings at once; the files go after
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def recover(self) -> list[str]:
        """Finish every interrupted overwrite (what each API start does first). Returns the names fixed."""
        fixed = []
        with self._publish_lock():
            for journal in sorted(self.root.glob(f"{JOURNAL_PREFIX}*.json")):
                name = journal.name[len(JOURNAL_PREFIX) : -len(".json")]
                if self._recover(name):
                    fixed.append(name)
        return fixed

    def sweep(self, grace_s: float = SWEEP_GRACE_S) -> int:
        """Finish interrupted overwrites, then delete staging and trash folders older than ``grace_s`` that no
        live publisher holds. Under the publish lock, so never in the middle of a swap."""
        removed = 0
        self.recover()
        with self._publish_lock():
            for entry in sorted(self.root.iterdir()):
                if entry.name.startswith(JOURNAL_PREFIX) and entry.name.endswith(".part"):
                    if _leftover_age_s(entry) >= grace_s:
                        entry.unlink(missing_ok=True)  # a journal torn before its rename: nothing was swapped
                    continue
                if not entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                    continue
                if _leftover_age_s(entry) < grace_s or not _abandoned(entry):
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
