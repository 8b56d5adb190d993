"""Which storage a root names: a local folder (a path or ``file://``) or an fsspec URL (object storage), and the
one the settings name (``BONE_REGISTRY_URL``, else ``<data dir>/adapters``). The registry and the shared resume
checkpoints open theirs here, so both always live in the same store."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.storage.local import LocalStorage
from core.storage.objects import ObjectStorage

if TYPE_CHECKING:
    from core.settings import Settings


def open_storage(
    root: Path | str, cache_dir: Path | None = None, storage_options: dict[str, Any] | None = None, cache_bytes: int = 0
) -> LocalStorage | ObjectStorage:
    text = str(root)
    if "://" not in text:
        return LocalStorage(Path(text))
    if text.startswith("file://"):
        return LocalStorage(Path(text[len("file://") :]))
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "bone-registry-cache"
    return ObjectStorage(text, cache, storage_options, cache_bytes=cache_bytes)


def storage_from_settings(settings: Settings) -> LocalStorage | ObjectStorage:
    if not settings.registry_url:
        return open_storage(settings.registry_dir)
    options: dict[str, Any] = {}
    if settings.s3_endpoint_url and settings.registry_url.startswith(("s3://", "s3a://")):
        options["endpoint_url"] = settings.s3_endpoint_url
    return open_storage(
        settings.registry_url,
        cache_dir=settings.registry_cache_dir,
        storage_options=options,
        cache_bytes=settings.registry_cache_bytes,
    )
