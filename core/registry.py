"""The adapter registry: one folder per adapter in PEFT's layout plus ``metadata.json``.

    <root>/<name>/adapter_config.json
    <root>/<name>/adapter_model.safetensors
    <root>/<name>/metadata.json        base model, Bone config, job id, metrics, sha256 + size of the weights

Publishing is atomic: files are written into a hidden staging folder, fsynced, then renamed into place,
so a reader sees either no adapter or a whole one. Hidden folders (``.staging-*``, ``.trash-*``) are never
listed; leftovers of an interrupted publish are swept on start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from core.errors import Conflict, CorruptAdapter, NotFound
from core.jobs import check_adapter_name

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "metadata.json"


class AdapterInfo(BaseModel):
    name: str
    object: str = "adapter"
    base_model: str
    bone: dict[str, Any]
    job_id: str | None = None
    owner: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    sha256: str
    size_bytes: int
    created_at: float
    lineage: dict[str, Any] | None = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterRegistry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # --- paths -----------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise NotFound(str(exc), param="name") from None
        return self.root / name

    # --- read ------------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return (self.path(name) / METADATA_FILE).is_file()

    def get(self, name: str) -> AdapterInfo:
        meta = self.path(name) / METADATA_FILE
        try:
            return AdapterInfo.model_validate_json(meta.read_bytes())
        except FileNotFoundError:
            raise NotFound(f"no adapter named {name!r}", param="adapter") from None

    def list(self) -> list[AdapterInfo]:
        infos = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not (entry / METADATA_FILE).is_file():
                continue
            try:
                infos.append(AdapterInfo.model_validate_json((entry / METADATA_FILE).read_bytes()))
            except (OSError, ValueError):
                continue  # a damaged entry must not hide the others
        return infos

    def verified_weights(self, name: str) -> tuple[Path, AdapterInfo]:
        """The weights path after checking its sha256 against the metadata; raises CorruptAdapter naming it."""
        info = self.get(name)
        weights = self.path(name) / WEIGHTS_FILE
        try:
            actual = file_sha256(weights)
        except OSError as exc:
            raise CorruptAdapter(f"adapter {name!r}: cannot read {weights}: {exc}", param="adapter") from None
        if actual != info.sha256:
            raise CorruptAdapter(
                f"adapter {name!r}: {weights} has sha256 {actual[:12]}…, metadata says {info.sha256[:12]}…; refusing to load it",
                param="adapter",
            )
        return weights, info

    def adapter_config(self, name: str) -> dict[str, Any]:
        return json.loads((self.path(name) / CONFIG_FILE).read_text())

    # --- write -----------------------------------------------------------------------------------------
    def publish(self, name: str, source_dir: Path, metadata: dict[str, Any], *, overwrite: bool = False) -> AdapterInfo:
        """Copy an adapter folder (PEFT layout) into the registry atomically and return its metadata."""
        target = self.path(name)
        if target.exists() and not overwrite:
            raise Conflict(f"adapter {name!r} already exists; pass overwrite=true to replace it", param="adapter_name",
                           code="adapter_exists")
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for filename in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(Path(source_dir) / filename, staging / filename)
            weights = staging / WEIGHTS_FILE
            info = AdapterInfo(
                name=name,
                sha256=file_sha256(weights),
                size_bytes=weights.stat().st_size,
                created_at=time.time(),
                **metadata,
            )
            (staging / METADATA_FILE).write_text(info.model_dump_json(indent=2))
            for child in staging.iterdir():
                _fsync_path(child)
            _fsync_path(staging)
            self._swap_into_place(staging, target, overwrite)
            _fsync_path(self.root)
            return info
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _swap_into_place(self, staging: Path, target: Path, overwrite: bool) -> None:
        trash = None
        if target.exists():
            if not overwrite:
                raise Conflict(f"adapter {target.name!r} already exists", param="adapter_name", code="adapter_exists")
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            os.rename(target, trash)
        try:
            os.rename(staging, target)  # fails (ENOTEMPTY) if another publisher won the race
        except OSError:
            if trash is not None:
                os.rename(trash, target)
            raise Conflict(f"adapter {target.name!r} was published concurrently", param="adapter_name",
                           code="adapter_exists") from None
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def delete(self, name: str) -> None:
        target = self.path(name)
        if not (target / METADATA_FILE).is_file():
            raise NotFound(f"no adapter named {name!r}", param="name")
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.rename(target, trash)  # disappears from listings at once; the files go after
        shutil.rmtree(trash, ignore_errors=True)

    def sweep(self) -> int:
        """Remove leftovers of interrupted publishes/deletes. Returns how many were removed."""
        removed = 0
        for entry in self.root.iterdir():
            if entry.name.startswith((".staging-", ".trash-")):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
