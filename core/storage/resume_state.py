"""Resume state of unfinished jobs, kept in the registry's store so that a job re-queued onto any worker resumes.

A worker writes each checkpoint folder (``worker.resume``: Bone blocks, optimizer, RNG states, loop
position) into its own data dir first, then copies it here; a worker that picks the job up later, on any
machine that sees the registry, fetches the newest one back into its own data dir. Hidden under the
registry's root, so the adapter listing and the registry's sweep never see it:

    <registry root>/.resume/<job id>/manifest.json               written last: which checkpoints are whole
    <registry root>/.resume/<job id>/step-00000040-<random>/...  the files of one checkpoint

Atomic by writing the manifest last (one PUT on object storage, a rename in a folder): a checkpoint whose
files were half written when its writer died is named by no manifest, so it is never resumed. The manifest
lists each file's sha256, checked after the download, and the newest ``keep`` checkpoints, newest last;
folders it no longer names are deleted after it is written. One writer per job at a time (the job's
heartbeat keeps a second attempt out, and only rank 0 of a distributed job writes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.storage.common import file_sha256, fsync_path
from core.storage.local import LocalStorage
from core.storage.objects import ObjectStorage

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

RESUME_DIR = ".resume"  # hidden: a registry lists and sweeps only names that do not start with "."
MANIFEST = "manifest.json"


def _files(folder: Path) -> Iterator[tuple[str, Path]]:
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


class _FolderFiles:
    """The resume area of a local (or shared, e.g. NFS) registry folder."""

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

    def put_folder(self, folder: Path, key: str) -> None:
        target = self.root / key
        for name, path in _files(folder):
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


class _ObjectFiles:
    """The resume area of an object-storage registry (any fsspec URL): a PUT of one object is atomic."""

    def __init__(self, storage: ObjectStorage) -> None:
        self.storage = storage

    def _key(self, key: str) -> str:
        return self.storage._key(RESUME_DIR, key)

    def read(self, key: str) -> bytes:
        with self.storage._reachable():
            return self.storage.fs.cat_file(self._key(key))

    def write_atomic(self, key: str, data: bytes) -> None:
        with self.storage._reachable():
            self.storage.fs.pipe_file(self._key(key), data)

    def put_folder(self, folder: Path, key: str) -> None:
        with self.storage._reachable():
            for name, path in _files(folder):
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


class ResumeStore:
    """The resume checkpoints of every job, in the registry's store (``from_settings``: the registry the
    worker publishes to, so every worker that can publish can also resume)."""

    def __init__(self, storage: LocalStorage | ObjectStorage) -> None:
        if isinstance(storage, LocalStorage):
            self.files: _FolderFiles | _ObjectFiles = _FolderFiles(storage.root / RESUME_DIR)
        else:
            self.files = _ObjectFiles(storage)

    @classmethod
    def from_settings(cls, settings: Settings) -> ResumeStore:
        from core.storage.opening import storage_from_settings

        return cls(storage_from_settings(settings))

    def for_job(self, job_id: str) -> JobResume:
        return JobResume(self, job_id)

    # --- one job -----------------------------------------------------------------------------------------
    def manifest(self, job_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.files.read(f"{job_id}/{MANIFEST}"))
        except FileNotFoundError:
            return None

    def put(self, job_id: str, step: int, folder: Path, *, keep: int) -> None:
        """Copy a whole local checkpoint folder in, then name it in the manifest; keep the newest ``keep``."""
        name = f"step-{step:08d}-{uuid.uuid4().hex[:8]}"
        files = {rel: {"sha256": file_sha256(path), "size": path.stat().st_size} for rel, path in _files(folder)}
        self.files.put_folder(folder, f"{job_id}/{name}")
        before = (self.manifest(job_id) or {}).get("checkpoints", [])
        # A step done again (an attempt that resumed from an earlier one) replaces what the dead attempt saved.
        entries = [e for e in before if e["step"] < step]
        entries.append({"step": step, "folder": name, "files": files, "created_at": time.time()})
        entries = entries[-keep:]
        manifest = {"job_id": job_id, "checkpoints": entries}
        self.files.write_atomic(f"{job_id}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        named = {e["folder"] for e in entries} | {MANIFEST}
        for child in self.files.children(job_id):
            if child not in named and not child.startswith(".part-"):
                self.files.remove(f"{job_id}/{child}")

    def fetch_newest(self, job_id: str, into: Path) -> tuple[int, Path] | None:
        """The newest whole checkpoint of the job as a local folder under ``into`` (``step-<8 digits>``, as
        ``worker.resume`` names them), files sha256-checked; None when the job has none. Files already
        there with the right sha256 (this machine wrote them) are not fetched again. Several processes may
        fetch the same checkpoint at once (the ranks of one machine): each file lands by an atomic rename."""
        manifest = self.manifest(job_id)
        for entry in reversed((manifest or {}).get("checkpoints", [])):
            target = into / f"step-{entry['step']:08d}"
            try:
                for rel, want in entry["files"].items():
                    local = target / rel
                    if local.is_file() and file_sha256(local) == want["sha256"]:
                        continue
                    self.files.get_file(f"{job_id}/{entry['folder']}/{rel}", local)
                    if file_sha256(local) != want["sha256"]:
                        local.unlink(missing_ok=True)
                        raise ValueError(f"{rel} does not match its sha256 in the manifest")
            except (FileNotFoundError, ValueError) as exc:
                log.warning(
                    "job %s: checkpoint of step %s unusable (%s); trying an older one", job_id, entry["step"], exc
                )
                continue
            return entry["step"], target
        return None

    def remove(self, job_id: str) -> None:
        self.files.remove(job_id)

    # --- every job -----------------------------------------------------------------------------------------
    def job_ids(self) -> list[str]:
        return [name for name in self.files.children("") if not name.startswith(".")]

    def age_s(self, job_id: str) -> float:
        """Seconds since anything of the job's was last written here (0 when nothing is left)."""
        try:
            return self.files.age_s(job_id)
        except FileNotFoundError:
            return 0.0


class JobResume:
    """One job's view of the store: what ``worker.resume`` and ``worker.train`` are handed."""

    def __init__(self, store: ResumeStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id

    def put(self, step: int, folder: Path, *, keep: int) -> None:
        self.store.put(self.job_id, step, folder, keep=keep)

    def fetch_newest(self, into: Path) -> Path | None:
        found = self.store.fetch_newest(self.job_id, into)
        return found[1] if found else None

    def remove(self) -> None:
        self.store.remove(self.job_id)
