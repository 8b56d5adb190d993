"""The fine-tuning job: what a client asks for (``JobCreate``) and what the service records (``Job``).

Both processes import this: the API validates and stores a ``Job``; the worker reads it back, runs it and
updates status, progress and metrics.
"""

from __future__ import annotations

import re
import time
import uuid
from enum import Enum
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

ADAPTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)


def check_adapter_name(name: str) -> str:
    # ".." would still match the pattern's character class; refuse anything that is not one plain path part.
    if not _ADAPTER_NAME.match(name) or ".." in name:
        raise ValueError(f"adapter name {name!r} must match {ADAPTER_NAME_PATTERN} (lowercase letters, digits, '.', '_', '-')")
    return name


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- datasets: exactly one form -------------------------------------------------------------------------------
class RecordsDataset(_Strict):
    records: list[dict[str, Any]] = Field(min_length=1, description="rows: {'text'} or {'prompt','completion'} or {'messages'}")


class PathDataset(_Strict):
    path: str = Field(min_length=1, description="JSONL/CSV/Parquet file inside the data dir's datasets folder")


class FileDataset(_Strict):
    file_id: str = Field(min_length=1)


class HFDataset(_Strict):
    hf_dataset: str = Field(min_length=1)
    split: str = "train"
    revision: str | None = None


DatasetSpec = Union[RecordsDataset, PathDataset, FileDataset, HFDataset]


class BoneSpec(_Strict):
    """Bone configuration, PEFT's field names. Defaults suit a small model; `r` is also bounded by settings."""

    r: int = Field(8, ge=1)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | Literal["bat"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: str | None = None
    bias: Literal["none", "all", "bone_only"] = "none"


class TrainingSpec(_Strict):
    epochs: float = Field(3.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_seq_length: int = Field(512, ge=8)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42


class JobCreate(_Strict):
    adapter_name: str
    dataset: DatasetSpec
    base_model: str | None = Field(None, description="defaults to the server's base model")
    bone: BoneSpec = Field(default_factory=BoneSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    overwrite: bool = False

    @field_validator("adapter_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_adapter_name(value)


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None


class Job(BaseModel):
    """The job record as stored in Redis and returned by the API."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: JobStatus = JobStatus.QUEUED
    adapter_name: str
    base_model: str
    dataset: dict[str, Any]  # summary; inline records are stored apart (see JobStore)
    bone: BoneSpec
    training: TrainingSpec
    overwrite: bool = False
    owner: str | None = None
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    error: str | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0

    @staticmethod
    def new_id() -> str:
        return "job-" + uuid.uuid4().hex[:20]


def dataset_summary(dataset: DatasetSpec) -> dict[str, Any]:
    """What a job record shows of its dataset: the reference, never the inline rows themselves."""
    if isinstance(dataset, RecordsDataset):
        return {"records": len(dataset.records)}
    return dataset.model_dump(exclude_none=True)


