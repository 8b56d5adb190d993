"""Training files: ``POST /files`` (multipart JSONL/JSON/CSV/Parquet, every row checked before the file is
accepted), ``GET /files``, ``GET /files/{id}``, ``DELETE /files/{id}``. Jobs use them as ``{"file_id": ...}``.

The upload is bounded twice: the body-size middleware refuses more than BONE_MAX_UPLOAD_BYTES as it
streams in, and the copy to disk counts again (413 either way). A key sees only its own owner's files.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from app.auth import PrincipalDep
from app.deps import SettingsDep
from app.schemas import Deleted, Listing
from core.auth import Principal
from core.errors import InvalidRequest, NotFound
from core.files import FileInfo, FileStore
from core.jobs import MAX_NAME_CHARS
from core.quotas import QuotaExceeded, bound, check_file_bytes

router = APIRouter(prefix="/files", tags=["files"])


class FileList(Listing[FileInfo]):
    pass


class FileDeleted(Deleted):
    object: Literal["file"] = "file"


def _store(settings) -> FileStore:
    return FileStore(settings.files_dir)


def _visible(store: FileStore, file_id: str, principal: Principal) -> FileInfo:
    info = store.get(file_id)
    if not principal.can_see(info.owner):
        raise NotFound(f"no file with id {file_id!r}", param="file_id")  # as for a missing id
    return info


@router.post("", status_code=201, response_model=FileInfo)
async def upload_file(settings: SettingsDep, principal: PrincipalDep,
                      file: Annotated[UploadFile, File(description="JSONL, JSON, CSV or Parquet rows")],
                      format: Annotated[str | None, Form(max_length=64, description="text, prompt_completion or "
                                                         "messages; detected per row when unset")] = None) -> FileInfo:
    owner = principal.owner if principal.authenticated else None
    return await run_in_threadpool(_save_within_quota, settings, principal, file, owner, format)


def _save_within_quota(settings, principal: Principal, file: UploadFile, owner: str | None,
                       format: str | None) -> FileInfo:
    """Save, then hold the owner's files to BONE_MAX_FILE_BYTES_PER_OWNER (an upload's size is known only once
    it is read; one over the quota is deleted again before anyone sees it)."""
    if len(file.filename or "") > MAX_NAME_CHARS:
        raise InvalidRequest(f"the file name may have at most {MAX_NAME_CHARS} characters", param="file")
    store, limit = _store(settings), settings.max_file_bytes_per_owner
    used = sum(f.bytes for f in store.list() if f.owner == owner) if bound(principal, limit) else 0
    check_file_bytes(used, 1, principal, limit)  # already full: refused before a byte is copied
    info = store.save(file.file, file.filename or "", owner=owner, max_bytes=settings.max_upload_bytes,
                      expected_format=format)
    try:
        check_file_bytes(used, info.bytes, principal, limit)
    except QuotaExceeded:
        store.delete(info.id)
        raise
    return info


@router.get("", response_model=FileList)
def list_files(settings: SettingsDep, principal: PrincipalDep) -> FileList:
    return FileList(data=[f for f in _store(settings).list() if principal.can_see(f.owner)], has_more=False)


@router.get("/{file_id}", response_model=FileInfo)
def get_file(file_id: str, settings: SettingsDep, principal: PrincipalDep) -> FileInfo:
    return _visible(_store(settings), file_id, principal)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, settings: SettingsDep, principal: PrincipalDep) -> dict:
    store = _store(settings)
    _visible(store, file_id, principal)
    store.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
