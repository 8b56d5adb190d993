"""Adapter evaluations: what a client asks for (``EvalCreate``), what the service records (``Evaluation``) and
where both live (``EvalStore``, in Redis next to the jobs).

An evaluation scores one or more adapters (and, by default, the base model) on the same held-out rows:
mean token loss and perplexity, token accuracy and, for rows with a completion, exact match of a greedy
completion. The worker task is ``worker.evals.run_eval_job``; the API enqueues it by that dotted path.

Keys (all under ``bone:``):
  eval:{id}             the Evaluation as JSON
  evals                 sorted set of ids by creation time (listing, cursor pagination)
  eval:{id}:records     inline dataset rows (kept apart so listings stay small; deleted at the end, TTL)
  eval:{id}:cancel      cooperative-cancel flag the task polls between batches
  adapter_eval:{name}   the adapter's latest finished evaluation (``LatestEval``), shown by
                        ``GET /adapters/{name}`` while the adapter's sha256 is still the one evaluated
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import NotFound
from core.jobs import DatasetSpec, JobStatus, PathStr
from core.jobstore import (
    INLINE_RECORDS_TTL_S,
    PREFIX,
    index_new,
    non_final,
    page_newest_first,
    read_record,
    settle_ended,
    transition_record,
)
from core.names import BASE_ADAPTER, AdapterName
from core.requests import RequestModel

EVAL_TASK = "worker.evals.run_eval_job"
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


def _key(eval_id: str) -> str:
    return f"{PREFIX}eval:{eval_id}"


def _latest_key(name: str) -> str:
    return f"{PREFIX}adapter_eval:{name}"


class EvalStore:
    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn

    def create(
        self,
        evaluation: Evaluation,
        records: list[dict[str, Any]] | None = None,
        *,
        records_ttl_s: int = INLINE_RECORDS_TTL_S,
    ) -> None:
        pipe = self.conn.pipeline(transaction=True)
        pipe.set(_key(evaluation.id), evaluation.model_dump_json())
        if records is not None:  # deleted when the evaluation ends; the TTL covers one that never does
            pipe.set(_key(evaluation.id) + ":records", json.dumps(records), ex=records_ttl_s)
        index_new(pipe, PREFIX + "evals", evaluation.id, evaluation.created_at, evaluation.owner)
        pipe.execute()

    def get(self, eval_id: str) -> Evaluation:
        raw = self.conn.get(_key(eval_id))
        if raw is None:
            raise NotFound(f"no evaluation with id {eval_id!r}", param="eval_id")
        return read_record(Evaluation, raw, "evaluation", eval_id)

    def records(self, eval_id: str, which: str = "records") -> list[dict[str, Any]] | None:
        """Inline rows (``which`` is accepted for ``worker.data.load_rows``, which reads jobs the same way)."""
        raw = self.conn.get(_key(eval_id) + ":records")
        return None if raw is None else json.loads(raw)

    def list(
        self, *, limit: int = 20, after: str | None = None, owner: str | None = None
    ) -> tuple[list[Evaluation], bool]:
        """Newest first; ``owner`` keeps only that owner's. Returns (evaluations, has_more)."""
        return page_newest_first(
            self.conn, PREFIX + "evals", _key, Evaluation, limit=limit, after=after, owner=owner, what="evaluation"
        )

    def transition(self, eval_id: str, allowed_from: Iterable[JobStatus] | None = None, **fields: Any) -> Evaluation:
        """Atomically update (WATCH/MULTI), only from ``allowed_from`` (default: any non-final state)."""
        return transition_record(
            self.conn,
            _key(eval_id),
            Evaluation,
            non_final(allowed_from),
            fields,
            what="evaluation",
            record_id=eval_id,
            param="eval_id",
            also=lambda pipe, before, after: settle_ended(pipe, _key(eval_id), before, after),
        )

    # --- cancel ---------------------------------------------------------------------------------------
    def request_cancel(self, eval_id: str) -> None:
        self.conn.set(_key(eval_id) + ":cancel", "1", ex=7 * 24 * 3600)

    def cancel_requested(self, eval_id: str) -> bool:
        return bool(self.conn.exists(_key(eval_id) + ":cancel"))

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
