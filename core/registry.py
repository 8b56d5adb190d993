"""The adapter registry: named adapters in PEFT's layout plus their metadata, on local disk or object storage.

    AdapterRegistry(Path("adapters"))              a local directory (also "file:///..." URLs)
    AdapterRegistry("s3://bucket/prefix", ...)     any fsspec URL, for fleets of API replicas and workers
    AdapterRegistry.from_settings(settings)        BONE_REGISTRY_URL, else <data dir>/adapters

This module owns names, metadata (``AdapterInfo``), sha256 checks and errors; ``core.storage`` owns where the
bytes live and how a publish becomes visible atomically (rename for a directory, a manifest written last for
object storage). Either way a reader sees no adapter or a whole one, and ``verified_weights`` returns a local
file whose sha256 matches the metadata (object storage: downloaded once into a cache keyed by sha256).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, PrivateAttr

from core.errors import Conflict, CorruptAdapter, NotFound
from core.names import AdapterName
from core.storage import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, LocalStorage, ObjectStorage
from core.storage.common import file_sha256
from core.storage.opening import open_storage, storage_from_settings

if TYPE_CHECKING:
    from core.settings import Settings

__all__ = ["AdapterInfo", "AdapterRegistry", "file_sha256", "CONFIG_FILE", "WEIGHTS_FILE", "METADATA_FILE"]

# An overwrite may delete the version a reader just looked up; it then reads the manifest again.
READ_ATTEMPTS = 3


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

    _json: bytes | None = PrivateAttr(None)

    def json_bytes(self) -> bytes:
        """This entry as JSON, serialised once: listings share parsed entries (see ``_parse_metadata``), so a
        page of GET /adapters joins cached bytes instead of dumping 100 models per request."""
        if self._json is None:
            self._json = self.model_dump_json().encode()
        return self._json


# registry root -> (listing stamp, sorted listing); shared by every registry object of the process
_LISTINGS: dict[str, tuple[Any, tuple[AdapterInfo, ...]]] = {}


@functools.lru_cache(maxsize=16384)
def _parse_metadata(raw: bytes) -> AdapterInfo | None:
    """Parsed once per distinct metadata file content (listings re-read unchanged files from a cache)."""
    try:
        return AdapterInfo.model_validate_json(raw)
    except ValueError:
        return None


def _check_bytes_sha256(name: str, expected: str, data: bytes, label: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CorruptAdapter(
            f"adapter {name!r}: {label} has sha256 {actual[:12]}…, metadata says {expected[:12]}…; refusing to load it",
            param="adapter",
        )


def _check_sha256(name: str, expected: str, path: Path, label: str) -> None:
    """Raise CorruptAdapter unless ``path`` hashes to ``expected``; ``label`` names it (a path or an object URL).
    A missing file raises FileNotFoundError: the adapter may have been replaced meanwhile."""
    try:
        actual = file_sha256(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CorruptAdapter(
            f"adapter {name!r}: cannot read {label}: {exc.strerror or type(exc).__name__}", param="adapter"
        ) from None
    if actual != expected:
        raise CorruptAdapter(
            f"adapter {name!r}: {label} has sha256 {actual[:12]}…, metadata says {expected[:12]}…; refusing to load it",
            param="adapter",
        )


class AdapterRegistry:
    def __init__(
        self,
        root: Path | str | LocalStorage | ObjectStorage,
        *,
        cache_dir: Path | None = None,
        storage_options: dict[str, Any] | None = None,
        cache_bytes: int = 0,
    ) -> None:
        """``root``: a folder or an fsspec URL (opened here), or a storage already opened."""
        if isinstance(root, (LocalStorage, ObjectStorage)):
            self.storage = root
        else:
            self.storage = open_storage(root, cache_dir, storage_options, cache_bytes)

    @classmethod
    def from_settings(cls, settings: Settings) -> AdapterRegistry:
        return cls(storage_from_settings(settings))

    @property
    def root(self) -> Path | str:
        """The directory (Path) or the URL (str) of the registry."""
        return self.storage.root

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # --- paths -----------------------------------------------------------------------------------------
    def path(self, name: str) -> Path | str:
        """Where the adapter lives: its folder (local registry) or the URL of its prefix (object storage).
        A name that is not an adapter name is no adapter here, and never a path outside the registry."""
        try:
            AdapterName(name)
        except ValueError as exc:
            raise NotFound(str(exc), param="name") from None
        return self.storage.location(name)

    # --- read ------------------------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        self.path(name)
        return self.storage.has(name)

    def get(self, name: str) -> AdapterInfo:
        self.path(name)
        try:
            return AdapterInfo.model_validate_json(self.storage.read_metadata(name))
        except FileNotFoundError:
            raise NotFound(f"no adapter named {name!r}", param="adapter") from None

    def list(self) -> list[AdapterInfo]:
        """Every adapter, sorted by name. While the storage's listing stamp is unchanged the previous listing
        is reused: GET /adapters with 1,000 adapters then costs no file system call but one stat."""
        stamp = self.storage.listing_stamp()  # taken first: a change while we read gives the next call a new one
        cached = _LISTINGS.get(str(self.storage.root))
        if stamp is not None and cached is not None and cached[0] == stamp:
            return list(cached[1])
        infos = []
        for raw in self.storage.all_metadata():
            info = _parse_metadata(raw)
            if info is not None:  # a damaged entry must not hide the others
                infos.append(info)
        infos.sort(key=lambda info: info.name)
        if stamp is not None:
            _LISTINGS[str(self.storage.root)] = (stamp, tuple(infos))
        return infos

    def verified_weights(self, name: str) -> tuple[Path, AdapterInfo]:
        """A local path to the weights after checking their sha256 against the metadata; raises
        CorruptAdapter naming the file (or object) at fault. To load them, use ``verified_tensors``: a path
        may be re-read after the check."""
        return self._read_verified(
            name, lambda info: self.storage.weights(name, info.sha256, partial(_check_sha256, name, info.sha256))
        )

    def verified_bytes(self, name: str) -> tuple[bytes, AdapterInfo]:
        """The weights file's bytes, read once and sha256-checked: what is loaded is what was hashed."""
        return self._read_verified(
            name,
            lambda info: self.storage.read_weights(name, info.sha256, partial(_check_bytes_sha256, name, info.sha256)),
        )

    def verified_tensors(self, name: str) -> tuple[dict[str, Any], AdapterInfo]:
        """The adapter's tensors (on the CPU), loaded from the very bytes whose sha256 was checked."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        data, info = self.verified_bytes(name)
        try:
            return load(data), info
        except (SafetensorError, ValueError) as exc:
            raise CorruptAdapter(
                f"adapter {name!r}: {name}/{WEIGHTS_FILE} is not a readable safetensors file: {exc}", param="adapter"
            ) from None

    def _read_verified(self, name: str, read: Callable[[AdapterInfo], Any]) -> tuple[Any, AdapterInfo]:
        info = self.get(name)
        for attempt in range(READ_ATTEMPTS):
            try:
                return read(info), info
            except FileNotFoundError:
                latest = self.get(name)  # NotFound if it was deleted meanwhile
                if latest == info or attempt == READ_ATTEMPTS - 1:
                    raise CorruptAdapter(
                        f"adapter {name!r}: cannot read its weights ({name}/{WEIGHTS_FILE} is missing)", param="adapter"
                    ) from None
                info = latest  # replaced by a newer version while we read: serve that one
        raise AssertionError("unreachable")

    def adapter_config(self, name: str) -> dict[str, Any]:
        self.path(name)
        try:
            return self.storage.read_config(name)
        except FileNotFoundError:
            raise NotFound(f"no adapter named {name!r}", param="adapter") from None

    # --- write -----------------------------------------------------------------------------------------
    def publish(
        self,
        name: str,
        source_dir: Path,
        metadata: dict[str, Any],
        *,
        overwrite: bool = False,
        may_replace: Callable[[AdapterInfo], bool] | None = None,
    ) -> AdapterInfo:
        """Copy an adapter folder (PEFT layout) into the registry atomically and return its metadata.
        ``may_replace`` judges the adapter an overwrite would replace (e.g. same owner), atomically with the swap."""
        self.path(name)
        if not overwrite and self.storage.has(name):
            raise Conflict(
                f"adapter {name!r} already exists; pass overwrite=true to replace it",
                param="adapter_name",
                code="adapter_exists",
            )
        source_dir = Path(source_dir)
        weights = source_dir / WEIGHTS_FILE
        info = AdapterInfo(
            name=name,
            sha256=file_sha256(weights),
            size_bytes=weights.stat().st_size,
            created_at=time.time(),
            **metadata,
        )
        judge = None
        if may_replace is not None:

            def judge(raw: bytes) -> bool:
                current = _parse_metadata(raw)
                return current is not None and may_replace(current)

        self.storage.commit(name, source_dir, info.model_dump_json(indent=2), overwrite, judge)
        return info

    def delete(self, name: str) -> None:
        self.path(name)
        if not self.storage.remove(name):
            raise NotFound(f"no adapter named {name!r}", param="name")

    def sweep(self, grace_s: float | None = None) -> int:
        """Finish interrupted overwrites, then remove leftovers of interrupted publishes/deletes older than
        ``grace_s`` (default: the backend's own). Returns how many were removed."""
        return self.storage.sweep() if grace_s is None else self.storage.sweep(grace_s)

    def check_storage(self) -> None:
        """Raise ``StorageCapabilityError`` when the store cannot publish atomically (object storage without
        conditional writes); a local directory always can."""
        if isinstance(self.storage, ObjectStorage):
            self.storage.check_conditional_writes()
