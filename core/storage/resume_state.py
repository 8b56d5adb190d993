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

import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.storage.areas import FolderArea, ObjectArea, files_below
from core.storage.common import file_sha256
from core.storage.local import LocalStorage
from core.storage.objects import ObjectStorage

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

RESUME_DIR = ".resume"  # hidden: a registry lists and sweeps only names that do not start with "."
MANIFEST = "manifest.json"


class ResumeStore:
    """The resume checkpoints of every job, in the registry's store (``from_settings``: the registry the
    worker publishes to, so every worker that can publish can also resume)."""

    def __init__(self, storage: LocalStorage | ObjectStorage) -> None:
        if isinstance(storage, LocalStorage):
            self.files: FolderArea | ObjectArea = FolderArea(storage.root / RESUME_DIR)
        else:
            self.files = ObjectArea(storage, RESUME_DIR)

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
        files = {rel: {"sha256": file_sha256(path), "size": path.stat().st_size} for rel, path in files_below(folder)}
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
