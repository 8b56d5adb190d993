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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.formats import FormatName

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
class _Dataset(_Strict):
    format: FormatName | None = Field(None, description="row format for every row; detected per row when unset")


class RecordsDataset(_Dataset):
    records: list[dict[str, Any]] = Field(min_length=1, description="rows: {'text'} or {'prompt','completion'} or {'messages'}")


class PathDataset(_Dataset):
    path: str = Field(min_length=1, description="JSONL/CSV/Parquet file inside the data dir's datasets folder")


class FileDataset(_Dataset):
    file_id: str = Field(min_length=1)


class HFDataset(_Dataset):
    hf_dataset: str = Field(min_length=1, description="hub name, or a dataset folder inside the datasets dir")
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
    packing: bool = Field(False, description="concatenate examples into max_seq_length blocks (no padding)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% slower")
    # -- evaluation: on `validation_dataset` if the job has one, else on a seeded `eval_fraction` of the rows
    eval_fraction: float | None = Field(None, gt=0, lt=1)
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations (and one at the end)")
    early_stopping_patience: int | None = Field(None, ge=1, description="evaluations without a better eval loss")
    # -- checkpoints under the job's work dir; a retried job resumes from the newest
    save_every: int | None = Field(None, ge=1, description="steps between checkpoints")
    publish_checkpoints: bool = Field(False, description="also publish each checkpoint as adapter <name>-step-<n>")
    # -- one job on several devices (PyTorch distributed; bounded by BONE_MAX_NUM_PROCESSES)
    num_processes: int = Field(1, ge=1, le=64, description="training processes (one per GPU; gloo on CPU); each "
                               "takes a disjoint shard of every global batch, so the loss curve matches one process")

    @model_validator(mode="after")
    def _early_stopping_needs_eval(self) -> "TrainingSpec":
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every")
        if self.publish_checkpoints and self.save_every is None:
            raise ValueError("publish_checkpoints needs save_every")
        return self


class JobCreate(_Strict):
    adapter_name: str
    dataset: DatasetSpec
    base_model: str | None = Field(None, description="defaults to the server's base model")
    bone: BoneSpec = Field(default_factory=BoneSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    validation_dataset: DatasetSpec | None = Field(None, description="rows to evaluate on (instead of eval_fraction)")
    overwrite: bool = False
    queue: str | None = Field(None, description="worker queue (e.g. gpu-24g, cpu); default: chosen from the base "
                              "model (BONE_RESOURCE_QUEUES), else the server's default queue")

    @field_validator("adapter_name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_adapter_name(value)

    @model_validator(mode="after")
    def _eval_needs_rows(self) -> "JobCreate":
        if self.training.eval_every is not None and self.validation_dataset is None and self.training.eval_fraction is None:
            raise ValueError("training.eval_every needs validation_dataset or training.eval_fraction")
        return self


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    phase: str | None = None  # loading, tokenizing, training, evaluating, checkpointing, publishing
    eta_s: float | None = None  # seconds left, from this attempt's mean step time


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
    validation_dataset: dict[str, Any] | None = None  # summary, as `dataset`
    overwrite: bool = False
    owner: str | None = None
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    error: str | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    queue: str | None = None  # the RQ queue it was (last) put on; None = the server's default queue
    worker: str | None = None  # the worker that ran its latest attempt

    @staticmethod
    def new_id() -> str:
        return "job-" + uuid.uuid4().hex[:20]


def dataset_summary(dataset: DatasetSpec) -> dict[str, Any]:
    """What a job record shows of its dataset: the reference, never the inline rows themselves."""
    if isinstance(dataset, RecordsDataset):
        return {"records": len(dataset.records), **({"format": dataset.format} if dataset.format else {})}
    return dataset.model_dump(exclude_none=True)


