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
from app.deps import FilesDep, SettingsDep
from app.schemas import Deleted, Listing
from core.access import OwnedFiles
from core.auth import Principal
from core.errors import InvalidRequest
from core.files import FileInfo
from core.jobs import MAX_NAME_CHARS
from core.quotas import QuotaExceeded, bound, check_file_bytes

router = APIRouter(prefix="/files", tags=["files"])


class FileList(Listing[FileInfo]):
    pass


class FileDeleted(Deleted):
    object: Literal["file"] = "file"


@router.post("", status_code=201, response_model=FileInfo)
async def upload_file(
    settings: SettingsDep,
    files: FilesDep,
    principal: PrincipalDep,
    file: Annotated[UploadFile, File(description="JSONL, JSON, CSV or Parquet rows")],
    format: Annotated[
        str | None, Form(max_length=64, description="text, prompt_completion or messages; detected per row when unset")
    ] = None,
) -> FileInfo:
    return await run_in_threadpool(_save_within_quota, settings, files, principal, file, format)


def _save_within_quota(
    settings, files: OwnedFiles, principal: Principal, file: UploadFile, format: str | None
) -> FileInfo:
    """Save, then hold the owner's files to BONE_MAX_FILE_BYTES_PER_OWNER (an upload's size is known only once
    it is read; one over the quota is deleted again before anyone sees it)."""
    if len(file.filename or "") > MAX_NAME_CHARS:
        raise InvalidRequest(f"the file name may have at most {MAX_NAME_CHARS} characters", param="file")
    limit = settings.max_file_bytes_per_owner
    used = sum(f.bytes for f in files.list() if f.owner == principal.owner) if bound(principal, limit) else 0
    check_file_bytes(used, 1, principal, limit)  # already full: refused before a byte is copied
    info = files.save(file.file, file.filename or "", max_bytes=settings.max_upload_bytes, expected_format=format)
    try:
        check_file_bytes(used, info.bytes, principal, limit)
    except QuotaExceeded:
        files.delete(info.id)
        raise
    return info


@router.get("", response_model=FileList)
def list_files(files: FilesDep) -> FileList:
    return FileList(data=files.list(), has_more=False)


@router.get("/{file_id}", response_model=FileInfo)
def get_file(file_id: str, files: FilesDep) -> FileInfo:
    return files.get(file_id)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, files: FilesDep) -> dict:
    files.delete(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
