"""The RQ task the API enqueues by dotted path: ``worker.tasks.run_training_job(job_id)``.

One job, start to finish: queued -> running -> (succeeded | failed | cancelled). The task records every
outcome in the job record itself and returns normally, even on failure: the job record (not RQ's failed
registry) is what clients read, and RQ then has no traceback to hold. Tracebacks go to the log.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import redis
import torch

from core.base_model import pick_device
from core.errors import Conflict, ServiceError
from core.jobs import Job, JobStatus
from core.jobstore import JobStore
from core.logs import job_id_var
from core.registry import AdapterInfo, AdapterRegistry
from core.settings import Settings, get_settings
from worker import model_cache
from worker.data import load_rows, tokenize_rows
from worker.progress import ProgressReporter
from worker.train import Cancelled, train

log = logging.getLogger(__name__)
ADAPTER_NAME_IN_MODEL = "default"  # the name inside the BoneModel; the registry name is the job's adapter_name
MAX_ERROR_CHARS = 500

_settings_override: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """Make tasks in this process (and work-horses forked from it) use ``settings`` instead of the
    environment's: ``run_worker(settings)`` and tests call this."""
    global _settings_override
    _settings_override = settings


def current_settings() -> Settings:
    return _settings_override or get_settings()


# --- the task ---------------------------------------------------------------------------------------------
def run_training_job(job_id: str) -> str:
    """Run one fine-tuning job; returns its final status (also written to the job record)."""
    settings = current_settings()
    context = job_id_var.set(job_id)
    conn = redis.Redis.from_url(settings.redis_url)
    store = JobStore(conn)
    workdir = settings.jobs_dir / job_id
    try:
        job = _start(store, job_id)
        if job is None:
            return store.get(job_id).status.value
        try:
            info = _train_and_publish(job, store, settings, workdir)
        except Cancelled:
            _finish(store, job_id, JobStatus.CANCELLED, "cancelled; nothing was published")
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's `error`
            log.exception("job %s failed", job_id)  # the traceback goes to the log, one line to the job
            reason = describe_failure(exc)
            _finish(store, job_id, JobStatus.FAILED, reason, error=reason)
        else:
            _finish(store, job_id, JobStatus.SUCCEEDED, f"published adapter {info.name!r} (sha256 {info.sha256[:12]})",
                    metrics=info.metrics)
        return store.get(job_id).status.value
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # temp adapter files: published copies live in the registry
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # a non-forking worker keeps running: hand the job's GPU memory back
        job_id_var.reset(context)
        conn.close()


def _start(store: JobStore, job_id: str) -> Job | None:
    """Mark the job running, or return None when it must not run (cancelled, already final)."""
    job = store.get(job_id)
    if job.status.is_final:
        log.info("job %s is already %s; not running it", job_id, job.status.value)
        return None
    if store.cancel_requested(job_id):
        _finish(store, job_id, JobStatus.CANCELLED, "cancelled before it started")
        return None
    try:
        # RUNNING too: RQ may run a job again after its worker died mid-way; it starts from scratch.
        job = store.transition(job_id, [JobStatus.QUEUED, JobStatus.RUNNING], status=JobStatus.RUNNING,
                               started_at=time.time(), attempts=job.attempts + 1, error=None)
    except Conflict:
        log.info("job %s changed state before it started; not running it", job_id)
        return None
    store.add_event(job_id, "status", "running", status="running", attempt=job.attempts)
    log.info("job %s started (attempt %d): adapter %r on %r", job_id, job.attempts, job.adapter_name, job.base_model)
    return job


def _train_and_publish(job: Job, store: JobStore, settings: Settings, workdir: Path) -> AdapterInfo:
    from bone import BoneConfig, get_bone_model  # heavy; only the work-horse needs it

    reporter = ProgressReporter(store, job.id)
    device = pick_device(settings)

    # -- data first: a bad file fails before any model work
    rows = load_rows(job, store, settings)
    model, tokenizer = model_cache.model_for_job(job.base_model, settings, device)

    # -- the adapter (the job's own copy of the base model is wrapped in place; see worker.model_cache)
    config = BoneConfig(**job.bone.model_dump(), task_type="CAUSAL_LM", base_model_name_or_path=job.base_model)
    bone_model = get_bone_model(model, config, adapter_name=ADAPTER_NAME_IN_MODEL)
    trainable, total = bone_model.get_nb_trainable_parameters()

    data = tokenize_rows(rows, tokenizer, job.training.max_seq_length, should_stop=reporter.should_stop)
    formats = ", ".join(f"{n} {kind}" for kind, n in sorted(data.formats.items()))
    store.add_event(job.id, "message", f"{len(data.examples)} examples ({formats}); {data.truncated} truncated to "
                    f"max_seq_length, {data.dropped} without trainable tokens; training {trainable:,} of "
                    f"{total:,} parameters on {device.type}",
                    examples=len(data.examples), truncated=data.truncated, dropped=data.dropped,
                    trainable_params=trainable, device=device.type)

    # -- train
    result = train(bone_model, tokenizer, data.examples, job.training, device=device,
                   on_step=reporter.on_step, should_stop=reporter.should_stop)
    if reporter.should_stop():  # a cancel that arrived during the last step still wins over publishing
        raise Cancelled()
    metrics = {
        "train_loss": result.final_loss,
        "train_loss_last10": result.tail_loss(10),
        "train_loss_first": result.losses[0],
        "steps": result.steps,
        "epochs": round(result.epochs, 4),
        "train_examples": len(data.examples),
        "truncated_examples": data.truncated,
        "train_tokens": result.tokens,
        "train_runtime_s": round(result.seconds, 3),
    }
    log.info("job %s trained %d steps in %.1f s, loss %.4f -> %.4f", job.id, result.steps, result.seconds,
             result.losses[0], result.final_loss)

    # -- save, then publish atomically (the registry copies from the temp folder, then renames into place)
    adapter_dir = workdir / "adapter"
    bone_model.save_pretrained(adapter_dir, adapter_name=ADAPTER_NAME_IN_MODEL)
    registry = AdapterRegistry(settings.registry_dir)
    return registry.publish(job.adapter_name, adapter_dir, overwrite=job.overwrite, metadata={
        "base_model": job.base_model, "bone": config.to_dict(), "job_id": job.id, "owner": job.owner,
        "metrics": metrics,
    })


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


def mark_failed(conn: redis.Redis, job_id: str, reason: str) -> None:
    """For the worker process when a work-horse dies or a job is abandoned (the task could not record it)."""
    try:
        _finish(JobStore(conn), job_id, JobStatus.FAILED, reason, error=reason)
    except ServiceError as exc:  # e.g. NotFound: an RQ job that is not one of ours
        log.warning("could not mark job %s failed: %s", job_id, exc)
