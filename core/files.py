"""Uploaded training files (``POST /files``): read, validated row by row, stored, listed, deleted.

On disk, in ``settings.files_dir``:
  <file_id><ext>          the file as uploaded (.jsonl, .json, .csv or .parquet)
  <file_id>.meta.json     sidecar: filename, bytes, rows, format, owner, created_at

With a registry URL (``BONE_REGISTRY_URL``: a store every replica and worker shares), the store is the
registry's hidden area ``<registry root>/.files/`` instead (the same two names; the data first, the sidecar
last, so a file is listed only when whole; the sidecar also holds the data's sha256). ``settings.files_dir``
then only stages uploads and caches what this machine read, under ``.cache/``, checked against the sidecar's
size and sha256 when fetched, so a worker on another machine trains on the bytes that were uploaded.

The same reader serves the upload check and the worker (``{"file_id"}`` and ``{"path"}`` datasets), so a
job trains on exactly the rows that were validated. CSV cells stay strings (a completion "4" is text, not
an integer) and empty cells count as missing, as in Parquet.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydantic import BaseModel

from core.errors import InvalidRequest, NotFound, PayloadTooLarge, ServiceUnavailable
from core.formats import FORMATS, BadRow, detect_format
from core.storage.areas import FolderArea, ObjectArea
from core.storage.common import file_sha256

if TYPE_CHECKING:
    from core.settings import Settings

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_REPORTED_ROWS = 10  # the first bad rows named in an upload error; more would only bury the first one
_CHUNK = 1 << 20
FILES_DIR = ".files"  # in the registry's store; hidden, like the resume state
CACHE_DIR = ".cache"  # in settings.files_dir: shared files this machine fetched


class FileInfo(BaseModel):
    id: str
    object: str = "file"
    filename: str
    bytes: int
    rows: int
    format: str  # one of FORMATS, or "mixed"
    formats: dict[str, int]
    owner: str | None = None
    created_at: float
    suffix: str


class InvalidFile(InvalidRequest):
    """An upload with bad rows; the envelope also carries ``errors``: [{row, line, message}, ...]."""

    code = "invalid_file"

    def __init__(self, message: str, errors: list[dict[str, Any]], *, param: str = "file") -> None:
        super().__init__(message, param=param)
        self.errors = errors

    def to_dict(self) -> dict:
        body = super().to_dict()
        body["error"]["errors"] = self.errors
        return body


class FilesUnreachable(ServiceUnavailable):
    """The shared store of uploaded files did not answer (network, NFS, object store down): a passing
    condition, so a worker reading a job's file sends the job back to the queue rather than failing it."""


@contextlib.contextmanager
def _shared_io() -> Iterator[None]:
    """A missing file is an answer; any other failure of the shared store means it could not be reached."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (ServiceUnavailable, OSError) as exc:
        raise FilesUnreachable(f"the store of uploaded files is unreachable: {exc}") from exc


@dataclass
class RowError:
    """A line that could not even be parsed (bad JSON): kept in the stream so validation can name it."""

    message: str


# --- reading ---------------------------------------------------------------------------------------------
def iter_rows(path: Path, label: str | None = None) -> Iterator[tuple[int | None, Any]]:
    """(line number or None, row) for each data row of a JSONL/JSON/CSV/Parquet file."""
    label = label or path.name
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidRequest(f"dataset file {label!r} must be one of {', '.join(SUFFIXES)}", param="dataset")
    try:
        if suffix in (".jsonl", ".json"):
            yield from _json_rows(path)
        elif suffix == ".csv":
            yield from _csv_rows(path)
        else:
            yield from _parquet_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidRequest(f"cannot read dataset {label!r}: {first}", param="dataset") from exc


# utf-8-sig: a leading byte-order mark (Excel's "CSV UTF-8", pandas' encoding="utf-8-sig", Notepad) is
# dropped; otherwise it would glue itself to the first column's name ("\ufeffprompt") or the first JSON line.
def _json_rows(path: Path) -> Iterator[tuple[int | None, Any]]:
    with open(path, encoding="utf-8-sig") as handle:
        head = handle.read(1 << 12).lstrip()
        handle.seek(0)
        if head.startswith("["):  # a .json file holding one array of rows
            for row in json.load(handle):
                yield None, row
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, RowError(f"not valid JSON ({exc.msg} at column {exc.colno})")


def _csv_rows(path: Path) -> Iterator[tuple[int | None, Any]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield reader.line_num, {k: (v if v != "" else None) for k, v in row.items() if k is not None}


def _parquet_rows(path: Path) -> Iterator[tuple[int | None, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield None, row


def read_rows(path: Path, label: str | None = None) -> list[dict[str, Any]]:
    """Every row, for training; the first unparsable line is an error naming it."""
    rows = []
    for line, row in iter_rows(path, label):
        if isinstance(row, RowError):
            raise InvalidRequest(
                f"cannot read dataset {label or path.name!r}: line {line} is {row.message}", param="dataset"
            )
        rows.append(row)
    return rows


def validate_rows(path: Path, expected: str | None = None, label: str | None = None) -> dict[str, int]:
    """Check every row; raise InvalidFile naming the first bad ones, else return rows per format."""
    formats: dict[str, int] = {}
    errors: list[dict[str, Any]] = []
    bad = 0
    index = -1
    for index, (line, row) in enumerate(iter_rows(path, label)):
        where = f"row {index}" + (f" (line {line})" if line is not None else "")
        try:
            if isinstance(row, RowError):
                raise BadRow(f"{where}: {row.message}", row=index, param="file")
            kind = detect_format(row, index, expected)
        except BadRow as exc:
            bad += 1
            if len(errors) < MAX_REPORTED_ROWS:
                errors.append(
                    {"row": index, "line": line, "message": exc.message.replace(f"dataset row {index}", where, 1)}
                )
            continue
        formats[kind] = formats.get(kind, 0) + 1
    if index < 0:
        raise InvalidFile(f"{label or path.name!r} has no rows", [])
    if bad:
        listed = "; ".join(e["message"] for e in errors[:3])
        raise InvalidFile(f"{bad} of {index + 1} rows are invalid; first: {listed}", errors)
    return formats


# --- the store -------------------------------------------------------------------------------------------
def is_file_id(value: str) -> bool:
    return bool(value) and all(ch.isalnum() or ch in "-_" for ch in value)


class FileStore:
    """The uploaded files: in ``root`` (``settings.files_dir``), or, given ``shared``, in the registry's store
    with ``root`` as staging and cache (``from_settings`` picks)."""

    def __init__(self, root: Path, shared: FolderArea | ObjectArea | None = None) -> None:
        self.root = Path(root)
        self.shared = shared

    @classmethod
    def from_settings(cls, settings: Settings) -> FileStore:
        if not settings.registry_url:
            return cls(settings.files_dir)
        from core.storage.local import LocalStorage
        from core.storage.opening import storage_from_settings

        storage = storage_from_settings(settings)
        if isinstance(storage, LocalStorage):
            return cls(settings.files_dir, FolderArea(storage.root / FILES_DIR))
        return cls(settings.files_dir, ObjectArea(storage, FILES_DIR))

    def _meta(self, file_id: str) -> Path:
        return self.root / f"{file_id}.meta.json"

    def _sidecar(self, file_id: str) -> bytes:
        """The sidecar's bytes; FileNotFoundError when there is none."""
        if self.shared is None:
            return self._meta(file_id).read_bytes()
        with _shared_io():
            return self.shared.read(f"{file_id}.meta.json")

    def get(self, file_id: str) -> FileInfo:
        if not is_file_id(file_id):
            raise NotFound(f"no file with id {file_id!r}", param="file_id")
        try:
            return FileInfo.model_validate_json(self._sidecar(file_id))
        except FileNotFoundError:
            raise NotFound(f"no file with id {file_id!r}", param="file_id") from None

    def path(self, file_id: str) -> Path:
        """The stored data file (a local copy of a shared one); NotFound if it is gone."""
        info = self.get(file_id)
        if self.shared is not None:
            return self._fetch(info)
        path = self.root / f"{info.id}{info.suffix}"
        if not path.is_file():
            raise NotFound(f"file {file_id!r} has lost its data", param="file_id")
        return path

    def _fetch(self, info: FileInfo) -> Path:
        """The shared file in this machine's cache: fetched once, checked against the sidecar's size and sha256
        (file ids are never reused, so a cached copy of the right size stays valid)."""
        assert self.shared is not None
        name = f"{info.id}{info.suffix}"
        local = self.root / CACHE_DIR / name
        if local.is_file() and local.stat().st_size == info.bytes:
            return local
        want = json.loads(self._sidecar(info.id)).get("sha256")
        try:
            with _shared_io():
                self.shared.get_file(name, local)
        except FileNotFoundError:
            raise NotFound(f"file {info.id!r} has lost its data", param="file_id") from None
        if local.stat().st_size != info.bytes or (want and file_sha256(local) != want):
            local.unlink(missing_ok=True)
            raise NotFound(f"file {info.id!r} has lost its data (it does not match its sha256)", param="file_id")
        return local

    def list(self, owner: str | None = None) -> list[FileInfo]:
        if self.shared is not None:
            with _shared_io():
                found = self.shared.children("")
            names = [n for n in found if n.endswith(".meta.json") and not n.startswith(".")]
        elif self.root.is_dir():
            names = [meta.name for meta in self.root.glob("*.meta.json")]
        else:
            return []
        infos = []
        for name in names:
            try:
                info = FileInfo.model_validate_json(self._sidecar(name.removesuffix(".meta.json")))
            except (OSError, ValueError):
                continue  # a half-deleted entry must not hide the others
            if owner is None or info.owner == owner:
                infos.append(info)
        return sorted(infos, key=lambda i: i.created_at, reverse=True)

    def save(
        self,
        source: BinaryIO,
        filename: str,
        *,
        max_bytes: int,
        owner: str | None = None,
        expected_format: str | None = None,
    ) -> FileInfo:
        """Copy an upload to disk (at most ``max_bytes``), validate every row, then make it visible."""
        suffix = Path(filename or "").suffix.lower()
        if suffix not in SUFFIXES:
            raise InvalidRequest(f"file {filename!r} must end in one of {', '.join(SUFFIXES)}", param="file")
        if expected_format is not None and expected_format not in FORMATS:
            raise InvalidRequest(f"format must be one of {', '.join(FORMATS)}", param="format")
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = "file-" + uuid.uuid4().hex[:24]
        staging = self.root / f".upload-{file_id}{suffix}"  # hidden and without a sidecar: never listed
        try:
            size = _copy_limited(source, staging, max_bytes)
            formats = validate_rows(staging, expected_format, label=filename)
            info = FileInfo(
                id=file_id,
                filename=Path(filename).name,
                bytes=size,
                rows=sum(formats.values()),
                format=next(iter(formats)) if len(formats) == 1 else "mixed",
                formats=formats,
                owner=owner,
                created_at=time.time(),
                suffix=suffix,
            )
            if self.shared is not None:
                self._share(staging, info)
                return info
            os.replace(staging, self.root / f"{file_id}{suffix}")
            tmp_meta = self.root / f".{file_id}.meta.tmp"
            tmp_meta.write_text(info.model_dump_json(indent=2))
            os.replace(tmp_meta, self._meta(file_id))  # the sidecar last: a file is listed only when whole
            return info
        finally:
            staging.unlink(missing_ok=True)

    def _share(self, staging: Path, info: FileInfo) -> None:
        """Into the shared store: the data, then the sidecar (with the sha256 readers check); the staged copy
        stays here as this machine's cached one."""
        assert self.shared is not None
        name = f"{info.id}{info.suffix}"
        sidecar = {**info.model_dump(), "sha256": file_sha256(staging)}
        self.shared.put_file(staging, name)
        self.shared.write_atomic(f"{info.id}.meta.json", json.dumps(sidecar, indent=2).encode())
        (self.root / CACHE_DIR).mkdir(exist_ok=True)
        os.replace(staging, self.root / CACHE_DIR / name)

    def delete(self, file_id: str) -> FileInfo:
        info = self.get(file_id)
        name = f"{info.id}{info.suffix}"
        if self.shared is not None:
            self.shared.remove(f"{file_id}.meta.json")  # first, so it disappears from listings at once
            self.shared.remove(name)
            # Other machines' cached copies stay until their data dir is cleared: no job can name the id again.
            (self.root / CACHE_DIR / name).unlink(missing_ok=True)
            return info
        self._meta(file_id).unlink(missing_ok=True)  # first, so it disappears from listings at once
        (self.root / name).unlink(missing_ok=True)
        return info


def _copy_limited(source: BinaryIO, target: Path, max_bytes: int) -> int:
    size = 0
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"file exceeds {max_bytes} bytes (BONE_MAX_UPLOAD_BYTES)", param="file")
            out.write(chunk)
    return size
