"""Adapter evaluations: what a client asks for (``EvalCreate``), what the service records (``Evaluation``) and
where both live (``EvalStore``, in Redis next to the jobs).

An evaluation scores one or more adapters (and, by default, the base model) on the same held-out rows:
mean token loss and perplexity, token accuracy and, for rows with a completion, exact match of a greedy
completion. The worker task is ``worker.evals.run_eval_job`` (``core.queueing.EVAL_TASK``).

Keys (all under ``bone:``) besides those of every record (core/records.py):
  adapter_eval:{name}   the adapter's latest finished evaluation (``LatestEval``), shown by
                        ``GET /adapters/{name}`` while the adapter's sha256 is still the one evaluated
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.jobs import DatasetSpec, JobStatus, PathStr
from core.names import BASE_ADAPTER, AdapterName
from core.records import PREFIX, RecordStore
from core.requests import RequestModel

MAX_ADAPTERS = 16

EvalStatus = JobStatus  # one lifecycle for everything the workers run: queued, running, succeeded, failed, cancelled


class EvalCreate(RequestModel):  # finite floats, bounded strings (core.requests)
    model_config = ConfigDict(extra="forbid")

    adapters: list[AdapterName] = Field(min_length=1, max_length=MAX_ADAPTERS, description="registry names to evaluate")
    include_base: bool = Field(True, description="also score the base model on the same rows")
    dataset: DatasetSpec
    base_model: PathStr | None = Field(
        None, description="defaults to the server's base model; every adapter must be on it"
    )
    max_examples: int = Field(1000, ge=1, le=100_000, description="the first N rows of the dataset")
    batch_size: int = Field(8, ge=1, le=256, description="examples per forward; each runs once per adapter in it")
    max_seq_length: int = Field(512, ge=8, le=1 << 20)
    max_new_tokens: int = Field(64, ge=0, le=1 << 20, description="greedy tokens for exact match; 0 skips exact match")

    @field_validator("adapters")
    @classmethod
    def _names(cls, names: list[AdapterName]) -> list[AdapterName]:
        if len(set(names)) != len(names):
            raise ValueError("adapters must not repeat a name")
        return names


class EvalMetrics(BaseModel):
    loss: float | None = None  # mean token loss over the tokens training would learn from
    perplexity: float | None = None  # exp(loss)
    token_accuracy: float | None = None  # argmax == target, over the same tokens
    tokens: int = 0
    examples: int = 0
    exact_match: float | None = None  # greedy completion == reference (whitespace-stripped); None: no such rows
    exact_match_examples: int = 0


class Evaluation(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    status: JobStatus = JobStatus.QUEUED
    adapters: list[AdapterName]
    include_base: bool = True
    base_model: str
    dataset: dict[str, Any]  # summary; inline rows are stored apart
    max_examples: int
    batch_size: int
    max_seq_length: int
    max_new_tokens: int
    owner: str | None = None
    queue: str | None = None
    adapter_sha256: dict[str, str] = Field(default_factory=dict)  # what was evaluated (filled by the worker)
    results: dict[str, EvalMetrics] = Field(default_factory=dict)  # adapter name or BASE_ADAPTER → metrics
    progress: dict[str, Any] = Field(default_factory=dict)  # phase, examples_done, examples_total
    error: str | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @staticmethod
    def new_id() -> str:
        return "eval-" + uuid.uuid4().hex[:20]

    @property
    def names(self) -> list[str]:
        """Result keys in row order: the adapters, then the base."""
        return [*self.adapters, *([BASE_ADAPTER] if self.include_base else [])]


class LatestEval(BaseModel):
    """What ``GET /adapters/{name}`` shows as ``latest_eval``."""

    eval_id: str
    sha256: str  # the adapter version evaluated: an overwritten adapter does not inherit its predecessor's eval
    dataset: dict[str, Any]
    metrics: EvalMetrics
    base: EvalMetrics | None = None  # the base model on the same rows, when the eval included it
    created_at: float
    finished_at: float | None = None


def _latest_key(name: str) -> str:
    return f"{PREFIX}adapter_eval:{name}"


class EvalStore(RecordStore[Evaluation]):
    def __init__(self, conn: redis.Redis) -> None:
        super().__init__(conn, Evaluation, kind="eval", what="evaluation", param="eval_id")

    # --- per adapter ----------------------------------------------------------------------------------
    def set_latest(self, name: str, latest: LatestEval) -> None:
        self.conn.set(_latest_key(name), latest.model_dump_json())

    def latest(self, name: str, sha256: str | None = None) -> LatestEval | None:
        """The adapter's latest finished evaluation; None when there is none or (with ``sha256``) when it
        scored another version of the adapter."""
        raw = self.conn.get(_latest_key(name))
        if raw is None:
            return None
        latest = LatestEval.model_validate_json(raw)
        return None if sha256 is not None and latest.sha256 != sha256 else latest
