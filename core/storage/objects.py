"""The registry on any fsspec filesystem (``s3://bucket/prefix``), made atomic by writing the manifest last.

Object stores have no rename, so each publish writes a new *version* folder and then, last,
``<name>/manifest.json`` (the metadata plus the version id and the adapter config). Readers see only names
whose manifest exists and read the files of the version it names, so a half-written publish is invisible and
an overwrite switches versions in one PUT. The manifest PUT is conditional (If-None-Match / If-Match), so two
concurrent publishers cannot both win. Old versions are deleted after the new manifest is in place; a reader
that raced gets FileNotFoundError and the registry re-reads.

    <prefix>/<name>/manifest.json
    <prefix>/<name>/<version>/adapter_config.json
    <prefix>/<name>/<version>/adapter_model.safetensors

Weights are served from local files: ``ObjectStorage`` downloads them once into a cache folder keyed by
sha256 (so a new version is a new file and an old one is never half-replaced under a reader).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import Conflict, CorruptAdapter, ServiceUnavailable
from core.storage.common import CONFIG_FILE, WEIGHTS_FILE, Check, CheckBytes, MayReplace, _in_use, _raced, _taken

MANIFEST_FILE = "manifest.json"
# Versions not named by a manifest are left alone this long: they may belong to a publish still uploading.
ORPHAN_GRACE_S = 3600.0


S3FS_MIN_VERSION = (2024, 12)  # the first s3fs whose pipe_file(mode="create") sends If-None-Match


class StorageCapabilityError(RuntimeError):
    """The registry's store cannot do what atomic publishing needs; start-up stops with this one line."""


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def new_version() -> str:
    # Milliseconds first: versions sort by age, and sweep() can tell an abandoned upload from a fresh one
    # without trusting the store's timestamps.
    return f"v{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"


def _version_age_s(version: str) -> float | None:
    try:
        return time.time() - int(version[1:14]) / 1000
    except ValueError:
        return None


def _precondition_failed(exc: BaseException) -> bool:
    """A conditional PUT lost (AWS says FileExistsError; stores that omit the condition name, like SeaweedFS,
    come through s3fs as EINVAL with the 412 code on the botocore cause)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = getattr(exc, "__cause__", None)
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return isinstance(exc, OSError) and exc.errno == errno.EINVAL and code in ("PreconditionFailed", "412")


class ObjectStorage:
    """The registry on any fsspec filesystem, made atomic by writing the manifest last."""

    def __init__(
        self, url: str, cache_dir: Path, storage_options: dict[str, Any] | None = None, *, cache_bytes: int = 0
    ) -> None:
        self.root = url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.cache_bytes = cache_bytes  # 0: the weights cache is not bounded
        self._options = dict(storage_options or {})
        self._fs: Any = None
        self._pid: int | None = None
        self._base = self._filesystem()[1]

    # --- plumbing ------------------------------------------------------------------------------------
    def _filesystem(self):
        """The fsspec filesystem, built again in a forked child (RQ's work-horse): an async client's event
        loop and connections do not survive a fork."""
        from fsspec.core import url_to_fs

        if self._pid != os.getpid():
            # No listing cache and no shared instance: a replica must see another's publish at once.
            fs, base = url_to_fs(self.root, skip_instance_cache=True, use_listings_cache=False, **self._options)
            self._fs, self._pid, self._base = fs, os.getpid(), base.rstrip("/")
        return self._fs, self._base

    @property
    def fs(self):
        return self._filesystem()[0]

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Missing objects and lost races are answers; anything else from the store means we cannot reach it."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, ValueError, KeyError, Conflict, CorruptAdapter):
            raise  # ValueError/KeyError: a damaged manifest, which the store did return
        except Exception as exc:  # noqa: BLE001 - network, auth and server errors of any fsspec backend
            if _precondition_failed(exc):
                raise
            if isinstance(exc, StorageCapabilityError):
                raise
            raise ServiceUnavailable(f"adapter registry {self.root} is unreachable: {exc}") from exc

    def _key(self, *parts: str) -> str:
        return "/".join((self._base, *parts))

    def location(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _all_keys(self) -> list[str]:
        """Every object under the prefix, in one paginated listing (and only under it: ``prefix2/`` is not ours)."""
        try:
            return [k for k in self.fs.find(self._base) if k.startswith(self._base + "/")]
        except FileNotFoundError:
            return []  # no bucket yet: nothing published

    # --- read ----------------------------------------------------------------------------------------
    def _manifest(self, name: str) -> dict[str, Any]:
        with self._reachable():
            return json.loads(self.fs.cat_file(self._key(name, MANIFEST_FILE)))

    def has(self, name: str) -> bool:
        with self._reachable():
            return self.fs.exists(self._key(name, MANIFEST_FILE))

    def read_metadata(self, name: str) -> bytes:
        with self._reachable():
            return self.fs.cat_file(self._key(name, MANIFEST_FILE))

    def listing_stamp(self) -> None:
        return None  # object stores give no cheap change token: every listing asks the store

    def all_metadata(self) -> list[bytes]:
        # One recursive listing, then every manifest fetched concurrently (fsspec's async cat): a few
        # requests for a thousand adapters instead of one round trip each.
        with self._reachable():
            keys = self._all_keys()
            depth = self._base.count("/") + 2
            manifests = sorted(
                k
                for k in keys
                if k.endswith("/" + MANIFEST_FILE) and k.count("/") == depth and not k.split("/")[-2].startswith(".")
            )
            if not manifests:
                return []
            found = self.fs.cat(manifests, on_error="omit")  # one deleted meanwhile is simply not listed
            return [found[k] for k in manifests if k in found]

    def read_config(self, name: str) -> dict[str, Any]:
        return self._manifest(name)["adapter_config"]  # in the manifest, so it always matches the version

    def weights(self, name: str, sha256: str, check: Check) -> Path:
        """A local copy of the weights whose manifest says ``sha256``; downloaded once, then reused."""
        cached = self.cache_dir / f"{sha256}.safetensors"
        if cached.is_file():
            try:
                check(cached, f"{name}/{WEIGHTS_FILE} (local copy)")
                os.utime(cached)  # recently used: the cache drops the least recently used copies first
                return cached
            except CorruptAdapter:
                cached.unlink(missing_ok=True)  # a damaged cache copy is fetched again, not a reason to refuse
        remote, label = self._remote_weights(name, sha256)
        part = self._part_file()
        try:
            with self._reachable():
                self.fs.get_file(remote, part)
            check(Path(part), label)
            os.replace(part, cached)  # same content under the same name if two loaders raced: harmless
        finally:
            Path(part).unlink(missing_ok=True)
        self._prune_cache(keep=cached)
        return cached

    def read_weights(self, name: str, sha256: str, check: CheckBytes) -> bytes:
        """The weights as bytes, checked: from the local copy when it is sound, else downloaded (and the copy
        kept). The caller loads these very bytes, so nothing can change them between the check and the load."""
        cached = self.cache_dir / f"{sha256}.safetensors"
        with contextlib.suppress(FileNotFoundError):
            data = cached.read_bytes()
            try:
                check(data, f"{name}/{WEIGHTS_FILE} (local copy)")
                os.utime(cached)
                return data
            except CorruptAdapter:
                cached.unlink(missing_ok=True)
        remote, label = self._remote_weights(name, sha256)
        with self._reachable():
            data = self.fs.cat_file(remote)
        check(data, label)
        part = self._part_file()
        try:
            Path(part).write_bytes(data)
            os.replace(part, cached)
        finally:
            Path(part).unlink(missing_ok=True)
        self._prune_cache(keep=cached)
        return data

    def _remote_weights(self, name: str, sha256: str) -> tuple[str, str]:
        """(key, label) of the weights of the version in place; FileNotFoundError if it is no longer ``sha256``."""
        manifest = self._manifest(name)
        if manifest["sha256"] != sha256:
            raise FileNotFoundError(f"{name}: replaced while reading")  # the registry re-reads
        return (
            self._key(name, manifest["version"], WEIGHTS_FILE),
            f"{self.root}/{name}/{manifest['version']}/{WEIGHTS_FILE}",
        )

    def _part_file(self) -> str:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(prefix=".part-", dir=self.cache_dir)  # mode 0600
        os.close(fd)
        return part

    def _prune_cache(self, keep: Path) -> None:
        """Drop the least recently used weight copies until the cache fits ``cache_bytes`` (never ``keep``,
        the one just fetched). A dropped copy is fetched again, and sha256-checked, on its next use."""
        if not self.cache_bytes:
            return
        entries = []
        for path in self.cache_dir.glob("*.safetensors"):
            with contextlib.suppress(FileNotFoundError):  # another process pruned it first
                st = path.stat()
                entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.cache_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size

    # --- start-up check ------------------------------------------------------------------------------
    def check_conditional_writes(self) -> None:
        """Refuse to serve a registry whose manifest writes are not conditional: two publishers could then both
        win. s3fs before 2024.12 drops ``mode="create"`` without a word, and some stores ignore If-None-Match;
        so check the version, then write one probe object twice with the condition: the second must fail."""
        if "s3" not in self._protocols():
            return
        import s3fs

        if _version_tuple(getattr(s3fs, "__version__", "0")) < S3FS_MIN_VERSION:
            raise StorageCapabilityError(
                f"s3fs {s3fs.__version__} cannot write conditionally (needs s3fs>=2024.12); "
                "pip install -U 'bone-server[s3]'"
            )
        probe = self._key(f".bone-probe-{uuid.uuid4().hex}")
        with self._reachable():
            try:
                self.fs.pipe_file(probe, b"1", mode="create")
                try:
                    self.fs.pipe_file(probe, b"2", mode="create")
                except Exception as exc:  # noqa: BLE001 - what a refused conditional PUT raises varies
                    if _precondition_failed(exc):
                        return
                    raise
                raise StorageCapabilityError(
                    f"the object store at {self.root} ignored a conditional write (If-None-Match); "
                    "concurrent publishes could overwrite each other, so the registry refuses to start"
                )
            finally:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(probe)

    def _protocols(self) -> set[str]:
        return {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)

    # --- write ---------------------------------------------------------------------------------------
    def commit(
        self, name: str, source_dir: Path, metadata_json: str, overwrite: bool, may_replace: MayReplace | None = None
    ) -> None:
        fs, version = self.fs, new_version()
        manifest_key = self._key(name, MANIFEST_FILE)
        with self._reachable():
            old_etag, old_version, old_raw = self._current(name)
            if old_etag is not None and not overwrite:
                raise _taken(name)
            # The manifest PUT below is conditional on old_etag: if another publisher replaces the manifest we
            # judged here, ours fails instead of replacing theirs unchecked.
            if old_raw is not None and may_replace is not None and not may_replace(old_raw):
                raise _in_use(name)
            config = json.loads((source_dir / CONFIG_FILE).read_text())
            for filename in (CONFIG_FILE, WEIGHTS_FILE):
                fs.put_file(str(source_dir / filename), self._key(name, version, filename))
            manifest = {**json.loads(metadata_json), "version": version, "adapter_config": config}
            try:
                self._put_manifest(manifest_key, json.dumps(manifest, indent=2).encode(), old_etag)
            except Exception as exc:
                with contextlib.suppress(Exception):  # ours, never visible; sweep() gets it if this fails too
                    fs.rm(self._key(name, version), recursive=True)
                if _precondition_failed(exc):
                    raise (_taken(name) if old_etag is None and not overwrite else _raced(name)) from None
                raise
            if old_version is not None:
                # Readers that still hold the old manifest get FileNotFoundError and re-read it.
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(self._key(name, old_version), recursive=True)

    def _current(self, name: str) -> tuple[str | None, str | None, bytes | None]:
        """(ETag, version, raw manifest) in place: all None when there is none; version None when it is
        unreadable (an overwrite still replaces it). ETag first: if the manifest changes between the two
        reads, the conditional PUT that follows fails instead of deleting the wrong version."""
        key = self._key(name, MANIFEST_FILE)
        try:
            etag = self.fs.info(key).get("ETag") or ""
            raw = self.fs.cat_file(key)
        except FileNotFoundError:
            return None, None, None
        try:
            return etag, json.loads(raw)["version"], raw
        except (ValueError, KeyError, TypeError):
            return etag, None, raw

    def _put_manifest(self, key: str, data: bytes, old_etag: str | None) -> None:
        if "s3" not in self._protocols():
            self.fs.pipe_file(key, data)  # other stores: last writer wins
        elif old_etag is None:
            self.fs.pipe_file(key, data, mode="create")  # If-None-Match: *
        elif not old_etag:
            self.fs.pipe_file(key, data)  # a store that gives no ETag: last writer wins
        else:
            self.fs.pipe_file(key, data, IfMatch=old_etag)  # compare-and-swap on the manifest we read

    def remove(self, name: str) -> bool:
        with self._reachable():
            etag, version, _ = self._current(name)
            if etag is None:
                return False
            with contextlib.suppress(FileNotFoundError):  # a concurrent delete got there first: gone either way
                self.fs.rm_file(self._key(name, MANIFEST_FILE))  # gone from listings at once
            if version is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self._key(name, version), recursive=True)
        return True

    def sweep(self, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Delete versions no manifest names (interrupted or lost publishes) once they are older than
        ``grace_s``, so no publisher can still be uploading them; and stale partial downloads in the cache."""
        removed = 0
        with self._reachable():
            keys = self._all_keys()
            live: dict[str, str | None] = {}
            versions: set[tuple[str, str]] = set()
            prefix_len = len(self._base) + 1
            for key in keys:
                parts = key[prefix_len:].split("/")
                if parts[0].startswith("."):
                    continue  # not an adapter: probes, resume checkpoints (core.storage.resume_state)
                if len(parts) == 2 and parts[1] == MANIFEST_FILE:
                    live.setdefault(parts[0], None)
                elif len(parts) == 3:
                    versions.add((parts[0], parts[1]))
            found = self.fs.cat([self._key(n, MANIFEST_FILE) for n in live], on_error="omit") if live else {}
            for name in list(live):
                try:
                    live[name] = json.loads(found[self._key(name, MANIFEST_FILE)])["version"]
                except (KeyError, ValueError):
                    live[name] = "?"  # unreadable manifest: cannot tell which version is live, so keep them all
            for name, version in sorted(versions):
                age = _version_age_s(version)
                if live.get(name) not in (version, "?") and age is not None and age > grace_s:
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(self._key(name, version), recursive=True)
                    removed += 1
        if self.cache_dir.is_dir():
            for part in self.cache_dir.glob(".part-*"):
                if time.time() - part.stat().st_mtime > grace_s:
                    part.unlink(missing_ok=True)
        return removed
