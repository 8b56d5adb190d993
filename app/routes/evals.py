"""Adapter evaluations: create (validate + enqueue), list, read, cancel.

``POST /evals`` scores adapters (and the base model) on held-out rows on a worker; the task is enqueued by
its dotted path (``core.queueing.EVAL_TASK``), so this process never imports ``worker``. An evaluation is
visible to its owner (and admins) only, like a job; each adapter named must be visible to the caller too.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated

import redis
from fastapi import APIRouter, Query
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus as RQStatus

from app.auth import PrincipalDep
from app.deps import EvalStoreDep, FilesDep, JobCheckerDep, RedisDep, RegistryDep, SettingsDep
from app.schemas import Page
from core.access import OwnedRecords
from core.errors import Conflict, InvalidRequest, NotFound
from core.evals import EvalCreate, Evaluation
from core.fleet import choose_queue
from core.jobs import FileDataset, JobStatus, dataset_summary
from core.queueing import EVAL_TASK, enqueue
from core.quotas import release_active, reserve_active

log = logging.getLogger(__name__)
router = APIRouter(prefix="/evals", tags=["evals"])


class EvaluationList(Page[Evaluation]):
    pass


@router.post("", status_code=202, response_model=Evaluation)
def create_eval(
    body: EvalCreate,
    settings: SettingsDep,
    conn: RedisDep,
    store: EvalStoreDep,
    registry: RegistryDep,
    files: FilesDep,
    checker: JobCheckerDep,
    principal: PrincipalDep,
) -> Evaluation:
    # Defaults the caller did not set follow a server capped below them instead of being refused.
    for field, cap in (("max_seq_length", settings.max_seq_length), ("max_new_tokens", settings.max_new_tokens)):
        if field not in body.model_fields_set:
            setattr(body, field, min(getattr(body, field), cap))
    if body.max_seq_length > settings.max_seq_length:
        raise InvalidRequest(
            f"max_seq_length={body.max_seq_length} exceeds the server's limit of "
            f"{settings.max_seq_length} (BONE_MAX_SEQ_LENGTH)",
            param="max_seq_length",
        )
    if body.max_new_tokens > settings.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens={body.max_new_tokens} exceeds the server's limit of "
            f"{settings.max_new_tokens} (BONE_MAX_NEW_TOKENS)",
            param="max_new_tokens",
        )
    base_model = body.base_model or settings.base_model
    for index, name in enumerate(body.adapters):
        try:
            info = registry.get(name)  # scoped: another owner's adapter is as missing as an unknown one
        except NotFound as exc:
            raise NotFound(exc.message, param=f"adapters.{index}") from None
        if info.base_model != base_model:
            raise Conflict(
                f"adapter {name!r} was trained on base model {info.base_model!r}, not {base_model!r}: "
                "adapters evaluated together must share one base model",
                param=f"adapters.{index}",
                code="base_model_mismatch",
            )
        if info.bone.get("bias", "none") != "none":
            raise Conflict(
                f"adapter {name!r} trained biases (bias={info.bone['bias']!r}), which live in the shared "
                "base model: it cannot share batches with other adapters",
                param=f"adapters.{index}",
                code="unservable_adapter",
            )
    records = checker._check_one(body.dataset, "dataset")  # the same dataset checks as POST /jobs
    if isinstance(body.dataset, FileDataset):
        files.check_usable(body.dataset.file_id, "dataset.file_id")
    queue_name = choose_queue(settings, None, base_model)  # where this base model's training jobs go
    evaluation = Evaluation(
        id=Evaluation.new_id(),
        adapters=body.adapters,
        include_base=body.include_base,
        base_model=base_model,
        dataset=dataset_summary(body.dataset),
        max_examples=body.max_examples,
        batch_size=body.batch_size,
        max_seq_length=body.max_seq_length,
        max_new_tokens=body.max_new_tokens,
        queue=queue_name,
    )
    reserve_active(conn, principal, evaluation.id, settings.max_active_jobs_per_owner)
    try:
        store.create(evaluation, records=records, records_ttl_s=settings.inline_records_ttl_s)
    except Exception:
        release_active(conn, principal, evaluation.id)
        raise
    try:
        enqueue(conn, settings, EVAL_TASK, evaluation.id, queue=queue_name)
    except Exception:
        try:  # never leave a record that claims to be queued when nothing will run it
            store.transition(
                evaluation.id, None, status=JobStatus.FAILED, error="could not be queued", finished_at=time.time()
            )
        except Exception:  # noqa: BLE001 - Redis is likely gone; the original error matters more
            pass
        raise
    log.info("queued %s for adapters %s", evaluation.id, ", ".join(body.adapters))
    return evaluation


@router.get("", response_model=EvaluationList)
def list_evals(
    store: EvalStoreDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[
        str | None, Query(max_length=256, description="id of the last evaluation of the previous page")
    ] = None,
) -> EvaluationList:
    found, has_more = store.list(limit=limit, after=after)
    return EvaluationList(data=found, has_more=has_more)


@router.get("/{eval_id}", response_model=Evaluation)
def get_eval(eval_id: str, store: EvalStoreDep, conn: RedisDep) -> Evaluation:
    return _reconcile(store, conn, store.get(eval_id))


@router.post("/{eval_id}/cancel", response_model=Evaluation)
def cancel_eval(eval_id: str, store: EvalStoreDep, conn: RedisDep) -> Evaluation:
    """Queued: cancelled at once. Running: the worker stops before its next batch. Already final: 409."""
    evaluation = store.get(eval_id)
    if evaluation.status.is_final:
        raise Conflict(
            f"evaluation {eval_id} is already {evaluation.status.value}", param="eval_id", code="invalid_state"
        )
    store.request_cancel(eval_id)
    if evaluation.status is JobStatus.QUEUED:
        try:
            RQJob.fetch(eval_id, connection=conn).cancel()
        except NoSuchJobError:
            pass
        try:
            return store.transition(eval_id, [JobStatus.QUEUED], status=JobStatus.CANCELLED, finished_at=time.time())
        except Conflict:
            pass  # a worker started it in between; it honours the flag
    return store.get(eval_id)


def _reconcile(store: OwnedRecords[Evaluation], conn: redis.Redis, evaluation: Evaluation) -> Evaluation:
    """A running evaluation whose RQ job failed outside the task (its process was killed) is failed."""
    if evaluation.status is not JobStatus.RUNNING:
        return evaluation
    try:
        status = RQJob.fetch(evaluation.id, connection=conn).get_status(refresh=False)
    except NoSuchJobError:
        return evaluation
    if status not in (RQStatus.FAILED, RQStatus.STOPPED):
        return evaluation
    try:
        return store.transition(
            evaluation.id,
            [JobStatus.RUNNING],
            status=JobStatus.FAILED,
            finished_at=time.time(),
            error="the evaluation process died before it finished",
        )
    except Conflict:
        return store.get(evaluation.id)
