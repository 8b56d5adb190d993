"""The steps every training job goes through, alone or in a co-training group (worker/cotrain_task.py):
start it (running, attempts + 1), read and tokenize its data, describe it, publish its adapter and record how it
ended. ``worker.tasks`` runs them for one job; ``worker.cotrain_task`` for each member of a group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
import torch

from core.access import may_publish_over
from core.base_model import pick_device
from core.errors import Conflict, ServiceError
from core.files import FilesUnreachable
from core.jobs import Job, JobStatus, check_job_size
from core.jobstore import JobStore
from core.paths import redact_server_paths
from core.published_checkpoints import unpublish_checkpoints
from core.registry import AdapterInfo, AdapterRegistry
from core.settings import Settings
from core.storage.resume_state import ResumeStore
from worker.context import worker_name
from worker.data import Cancelled, Example, load_rows, pack, split_eval, tokenize_rows
from worker.nodes import GangNotAssembled, Node
from worker.progress import ProgressReporter
from worker.publish import check_publishable
from worker.tokenized import ExampleWriter, example_lengths
from worker.train import TrainResult, count_steps

log = logging.getLogger(__name__)


MAX_ERROR_CHARS = 500


def _record_outcome(store: JobStore, settings: Settings, job: Job, work) -> None:
    """Run ``work`` (it trains and publishes the adapter) and record how it ended in the job. ``work`` returning
    None: rank 0 ran on another node, which records the outcome."""
    try:
        info = work()
    except Cancelled:
        unpublish_checkpoints(store, AdapterRegistry.from_settings(settings), job)
        _finish(store, job.id, JobStatus.CANCELLED, "cancelled; nothing was published")
    except GangNotAssembled:
        raise  # not the job's failure: it goes back to the queue
    except FilesUnreachable as exc:
        # Not the job's failure either: the reason goes on the job, and the janitor re-queues it once this
        # attempt's heartbeat stops (or fails it after BONE_MAX_ATTEMPTS, naming this reason).
        log.warning("job %s: %s", job.id, exc)
        store.transition(
            job.id, [JobStatus.RUNNING], attempt=job.attempts, error=redact_server_paths(exc.message, settings.data_dir)
        )
        store.add_event(job.id, "message", f"{exc.message}; the job goes back to the queue")
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's `error`
        log.exception("job %s failed", job.id)  # the traceback goes to the log, one line to the job
        reason = redact_server_paths(describe_failure(exc), settings.data_dir)  # users see it
        store.add_event(job.id, "error", reason)
        _finish(store, job.id, JobStatus.FAILED, reason, error=reason)
    else:
        if info is not None:
            _finish(
                store,
                job.id,
                JobStatus.SUCCEEDED,
                f"finished: published adapter {info.name!r} (sha256 {info.sha256[:12]})",
                metrics=info.metrics,
            )


def _remove_shared_checkpoints(settings: Settings, job_id: str) -> None:
    try:
        ResumeStore.from_settings(settings).remove(job_id)
    except Exception as exc:  # noqa: BLE001 - the store unreachable: the janitor's sweep removes them later
        log.warning("job %s: could not remove its checkpoints from the registry's store: %s", job_id, exc)


def _is_final(store: JobStore, job_id: str) -> bool:
    try:
        return store.get(job_id).status.is_final
    except (ServiceError, redis.RedisError):
        return False  # unknown: leave the work dir to the janitor's sweep


def _start(store: JobStore, job_id: str) -> Job | None:
    """Mark the job running, or return None when it must not run (cancelled, final, alive elsewhere)."""
    job = store.get(job_id)
    if job.status.is_final:
        log.info("job %s is already %s; not running it", job_id, job.status.value)
        return None
    if store.cancel_requested(job_id):
        _finish(store, job_id, JobStatus.CANCELLED, "cancelled before it started")
        return None
    if job.status is JobStatus.RUNNING and store.heartbeat(job_id) is not None:
        log.info("job %s is running in another live process; not running it twice", job_id)
        return None
    try:
        # RUNNING too: RQ may hand out a job again whose process died before the janitor saw it.
        job = store.transition(
            job_id,
            [JobStatus.QUEUED, JobStatus.RUNNING],
            status=JobStatus.RUNNING,
            started_at=time.time(),
            attempts=job.attempts + 1,
            error=None,
            worker=worker_name(),
        )
    except Conflict:
        log.info("job %s changed state before it started; not running it", job_id)
        return None
    store.add_event(
        job_id,
        "status",
        f"started (attempt {job.attempts})",
        status="running",
        attempt=job.attempts,
        worker=worker_name(),
    )
    log.info("job %s started (attempt %d): adapter %r on %r", job_id, job.attempts, job.adapter_name, job.base_model)
    return job


@dataclass
class _Trained:
    """What training leaves for publishing."""

    result: TrainResult
    config: Any  # BoneConfig
    adapter_dir: Path
    train_examples: int
    eval_examples: int
    truncated: int
    reporter: ProgressReporter
    extra_metrics: dict[str, float] = field(default_factory=dict)  # co-training: the job's share of the steps


@dataclass
class _Loaded:
    """A job's rows, read before any model work (a bad file fails first)."""

    reporter: ProgressReporter
    rows: Any
    validation_rows: Any
    speaks: bool  # this process reports the job's phases and messages


@dataclass
class _Data:
    """A job's tokenized examples (memory-mapped from its work dir) and what tokenizing found."""

    train_examples: Sequence[Example]
    eval_examples: Sequence[Example]
    summary: Any  # worker.data's tokenized result: rows, truncated, dropped, formats


def _load(job: Job, store: JobStore, settings: Settings, node: Node | None = None) -> _Loaded:
    reporter = ProgressReporter(store, job.id)
    # Nodes 1..M-1 of a multi-node job (a replacement may join mid-job) leave the job's phase and messages to
    # node 0 and rank 0
    speaks = node is None or node.is_host
    if speaks:
        reporter.phase("loading")
    rows = load_rows(job, store, settings)
    validation_rows = load_rows(job, store, settings, validation=True)
    if reporter.should_stop():
        raise Cancelled()
    return _Loaded(reporter, rows, validation_rows, speaks)


def _tokenize(job: Job, settings: Settings, workdir: Path, tokenizer, loaded: _Loaded) -> _Data:
    """Tokenize; hold out the eval rows; pack if asked. Streamed (with the loss masks, as int32) into int32
    Arrow files in the work dir that every rank memory-maps (worker/tokenized.py)."""
    spec, reporter = job.training, loaded.reporter
    if loaded.speaks:
        reporter.phase("tokenizing")
    tokens_dir = workdir / "tokens"
    data = tokenize_rows(
        loaded.rows,
        tokenizer,
        spec.max_seq_length,
        format=job.dataset.format,
        should_stop=reporter.should_stop,
        into=ExampleWriter(tokens_dir / "train.arrow"),
    )
    loaded.rows = None  # the tokens are on disk now; the raw rows are not needed again
    train_examples: Sequence[Example] = data.examples
    eval_examples: Sequence[Example] = []
    if loaded.validation_rows is not None:
        assert job.validation_dataset is not None  # load_rows gives validation rows only from it
        eval_examples = tokenize_rows(
            loaded.validation_rows,
            tokenizer,
            spec.max_seq_length,
            format=job.validation_dataset.format,
            should_stop=reporter.should_stop,
            param_prefix="validation_dataset.records",
            into=ExampleWriter(tokens_dir / "eval.arrow"),
        ).examples
    elif spec.eval_fraction is not None:
        train_examples, eval_examples = split_eval(train_examples, spec.eval_fraction, spec.seed)
    if spec.packing:
        train_examples = pack(
            train_examples,
            spec.max_seq_length,
            spec.seed,
            into=ExampleWriter(tokens_dir / "train-packed.arrow", packed=True),
        )
    if train_examples:  # the server's bounds on the job's real size (epochs only become steps here)
        mean_tokens = float(sum(example_lengths(train_examples))) / len(train_examples)
        check_job_size(spec, settings, steps=count_steps(len(train_examples), spec), tokens_per_example=mean_tokens)
    return _Data(train_examples, eval_examples, data)


def _describe(job: Job, store: JobStore, data: _Data, trainable: int, total: int, device: torch.device) -> None:
    """The job's data and adapter in one message event."""
    spec, summary = job.training, data.summary
    formats = ", ".join(f"{n} {kind}" for kind, n in sorted(summary.formats.items()))
    store.add_event(
        job.id,
        "message",
        f"{summary.rows} rows ({formats}): {summary.truncated} truncated to "
        f"max_seq_length={spec.max_seq_length}, {summary.dropped} without trainable tokens; "
        f"{len(data.train_examples)} training{' (packed)' if spec.packing else ''} and {len(data.eval_examples)} "
        f"eval examples; training {trainable:,} of {total:,} parameters on {device.type}",
        rows=summary.rows,
        examples=len(data.train_examples),
        eval_examples=len(data.eval_examples),
        truncated=summary.truncated,
        dropped=summary.dropped,
        trainable_params=trainable,
        device=device.type,
    )


def job_device(settings: Settings) -> torch.device:
    device = pick_device(settings)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # a worker pinned to cuda:N: anything that says just "cuda" means N too
    return device


def _publish(job: Job, store: JobStore, settings: Settings, trained: _Trained) -> AdapterInfo:
    reporter = trained.reporter
    result, config, adapter_dir, spec = trained.result, trained.config, trained.adapter_dir, job.training
    if reporter.should_stop():  # a cancel that arrived during the last step still wins over publishing
        raise Cancelled()
    metrics = {
        "train_loss": result.final_loss,
        "train_loss_last10": result.tail_loss(10),
        "train_loss_first": result.losses[0],
        "steps": result.steps,
        "epochs": round(result.epochs, 4),
        "train_examples": trained.train_examples,
        "truncated_examples": trained.truncated,
        "train_tokens": result.tokens,
        "train_runtime_s": round(result.seconds, 3),
    }
    if result.evals:
        metrics.update(
            eval_loss=result.evals[-1]["eval_loss"],
            eval_token_accuracy=result.evals[-1]["eval_token_accuracy"],
            best_eval_loss=min(e["eval_loss"] for e in result.evals),
            eval_examples=trained.eval_examples,
        )
    if result.stopped_early:
        metrics["stopped_early"] = 1
    if spec.num_processes > 1:
        metrics["num_processes"] = spec.num_processes
    if spec.num_nodes > 1:
        metrics["num_nodes"] = spec.num_nodes
    metrics.update(trained.extra_metrics)
    log.info(
        "job %s trained %d steps in %.1f s, loss %.4f -> %.4f",
        job.id,
        result.steps,
        result.seconds,
        result.losses[0],
        result.final_loss,
    )

    # -- save, then publish atomically (the registry copies from the temp folder, then renames into place)
    reporter.phase("publishing")
    check_publishable(adapter_dir)  # a diverged run's NaN/inf never reaches the registry
    registry = AdapterRegistry.from_settings(settings)
    # The API checked the name when it accepted the job, but training takes a while: another owner may have
    # taken it since. The registry judges what an overwrite would replace atomically with the swap.
    return registry.publish(
        job.adapter_name,
        adapter_dir,
        overwrite=job.overwrite,
        metadata={
            "base_model": job.base_model,
            "bone": config.to_dict(),
            "job_id": job.id,
            "owner": job.owner,
            "metrics": metrics,
        },
        may_replace=partial(may_publish_over, job.owner, job.id),
    )


def _finish(store: JobStore, job_id: str, status: JobStatus, message: str, **fields) -> None:
    """Record the final state, unless someone already made the job final (then theirs stands)."""
    try:
        store.transition(job_id, None, status=status, finished_at=time.time(), **fields)
    except Conflict:
        log.warning("job %s was already final; not marking it %s", job_id, status.value)
        return
    store.add_event(job_id, "status", message, status=status.value)
    log.info("job %s %s: %s", job_id, status.value, message)


def describe_failure(exc: BaseException) -> str:
    """One line a user can act on: our own errors as written, others prefixed with their type."""
    if isinstance(exc, ServiceError):
        text = exc.message
    elif isinstance(exc, ValueError) and type(exc).__module__.startswith("bone"):
        text = str(exc)
    elif type(exc).__name__ == "OutOfMemoryError":
        text = "out of GPU memory; lower training.batch_size or training.max_seq_length"
    else:
        text = f"{type(exc).__name__}: {exc}"
    line = " ".join(text.split())  # one line, whatever the original looked like
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 1] + "…"
