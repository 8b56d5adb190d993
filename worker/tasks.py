"""The RQ task the API enqueues by dotted path: ``worker.tasks.run_training_job(job_id)``.

One job, start to finish: queued -> running -> (succeeded | failed | cancelled). A job whose process dies
goes back to queued (core/janitor.py) and the next run resumes from its newest checkpoint. The task records every
outcome in the job record itself and returns normally, even on failure: the job record (not RQ's failed
registry) is what clients read, and RQ then has no traceback to hold. Tracebacks go to the log.
"""

from __future__ import annotations

import logging
import shutil
import socket
import uuid
from pathlib import Path

import redis
import torch

from core.errors import ServiceError
from core.jobs import Job, JobStatus
from core.jobstore import JobStore
from core.logs import job_id_var
from core.names import TRAINING_SLOT
from core.registry import AdapterInfo
from core.settings import Settings
from core.storage.resume_state import ResumeStore
from worker import model_cache
from worker.context import current_settings, worker_name
from worker.heartbeat import Heartbeat
from worker.job_steps import (  # noqa: F401 - re-exported: tests and worker.main import them from here
    MAX_ERROR_CHARS,
    _Data,
    _describe,
    _finish,
    _is_final,
    _load,
    _Loaded,
    _publish,
    _record_outcome,
    _remove_shared_checkpoints,
    _start,
    _tokenize,
    _Trained,
    describe_failure,
    job_device,
)
from worker.nodes import GangNotAssembled, MemberBeat, Node, joinable, node_address
from worker.publish import CheckpointPublisher
from worker.train import train

log = logging.getLogger(__name__)


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
        with Heartbeat(settings.redis_url, job_id, job.attempts, settings.heartbeat_ttl_s):
            from worker import cotrain_task

            if job.training.num_nodes > 1:
                _run_as_first_node(store, settings, job, workdir)
            elif cotrain_task.leads(settings, job):  # with companions claimed from the queue, if there are any
                _record_outcome(store, settings, job, lambda: _lead_or_train(job, store, settings, workdir))
            else:
                _record_outcome(store, settings, job, lambda: _train_and_publish(job, store, settings, workdir))
        return store.get(job_id).status.value
    finally:
        # Checkpoints stay while the job may still be retried; once it is final they are of no use.
        if _is_final(store, job_id):
            shutil.rmtree(workdir, ignore_errors=True)
            _remove_shared_checkpoints(settings, job_id)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # a non-forking worker keeps running: hand the job's GPU memory back
        job_id_var.reset(context)
        conn.close()


# --- a job on several machines (worker/nodes.py) ------------------------------------------------------------
def _run_as_first_node(store: JobStore, settings: Settings, job: Job, workdir: Path) -> None:
    """Node 0: open the gang, train, and record the outcome; when another node holds rank 0 it publishes and
    node 0 waits for it with the job's heartbeat on. A gang that did not assemble: the reason goes on the job
    and the janitor re-queues it once this task's heartbeat stops."""
    from worker import nodes

    count = job.training.num_nodes
    node = nodes.open_gang(store.conn, settings, job.id, job.attempts, count, job.queue)
    try:
        with nodes.GangKeeper(settings, job.id, job.attempts, count, job.queue) as keeper:
            try:
                _record_outcome(store, settings, job, lambda: _train_and_publish(job, store, settings, workdir, node))
            except GangNotAssembled as exc:
                log.warning("job %s: %s", job.id, exc)
                store.transition(job.id, [JobStatus.RUNNING], attempt=job.attempts, error=str(exc))
                store.add_event(job.id, "message", f"{exc}; the job goes back to the queue")
                return
            if not nodes.wait_until_final(store, keeper, job.id):
                log.warning("job %s: the node holding rank 0 left before publishing", job.id)
    finally:
        nodes.close_gang(store.conn, job.id, count)


def run_as_node(store: JobStore, settings: Settings, job: Job, node: Node) -> str:
    """Nodes 1..M-1 (``worker.tasks.run_node``): train with the gang; publish and finish the job only when this
    node held rank 0. Failures of the gang are node 0's to record."""
    # Inside the job's own work dir: the janitor's sweep keeps it while the job runs, and two nodes sharing a
    # data dir (two workers of one machine) do not collide.
    workdir = settings.jobs_dir / job.id / f"node-{node.index}"
    try:
        try:
            trained = _train(job, store, settings, workdir, node=node)
        except Exception as exc:  # noqa: BLE001 - node 0 sees the same failure and records it
            log.warning("job %s: node %d leaves the gang: %s", job.id, node.index, describe_failure(exc))
            return "left"
        if trained is None:
            return "joined"
        _record_outcome(store, settings, job, lambda: _publish(job, store, settings, trained))
        return store.get(job.id).status.value
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # a node resumes from the registry's store, never from here


def _lead_or_train(job: Job, store: JobStore, settings: Settings, workdir: Path) -> AdapterInfo | None:
    """Co-training on: read the rows, then lead a group if companions can be claimed (None: every member's
    outcome is recorded already), else train alone exactly as without co-training."""
    from worker import cotrain_task

    loaded = _load(job, store, settings)
    if cotrain_task.lead(store, settings, job, workdir, loaded):
        return None
    trained = _train(job, store, settings, workdir, loaded=loaded)
    return None if trained is None else _publish(job, store, settings, trained)


def _train_and_publish(
    job: Job, store: JobStore, settings: Settings, workdir: Path, node: Node | None = None
) -> AdapterInfo | None:
    """None when the job runs on several nodes and another one held rank 0 (that node publishes)."""
    trained = _train(job, store, settings, workdir, node=node)
    return None if trained is None else _publish(job, store, settings, trained)


def _train(
    job: Job,
    store: JobStore,
    settings: Settings,
    workdir: Path,
    node: Node | None = None,
    loaded: _Loaded | None = None,
) -> _Trained | None:
    """Load, tokenize and train; None when the job runs on several nodes and rank 0 was on another one.
    ``loaded``: its rows, when the caller read them already (a co-training leader that found no companions)."""
    from bone import get_bone_model  # heavy; only the work-horse needs it

    device = job_device(settings)
    spec = job.training

    # -- data first: a bad file fails before any model work
    if loaded is None:
        loaded = _load(job, store, settings, node)
    reporter = loaded.reporter
    model, tokenizer = model_cache.model_for_job(job.base_model, settings, device)

    # -- the adapter (the job's own copy of the base model is wrapped in place; see worker.model_cache)
    config = job.bone.to_config(task_type="CAUSAL_LM", base_model_name_or_path=job.base_model)
    bone_model = get_bone_model(model, config, adapter_name=TRAINING_SLOT)
    trainable, total = bone_model.get_nb_trainable_parameters()

    data = _tokenize(job, settings, workdir, tokenizer, loaded)
    train_examples, eval_examples = data.train_examples, data.eval_examples
    if loaded.speaks:
        _describe(job, store, data, trainable, total, device)

    # -- train (resuming from the newest checkpoint in the registry's store, if an earlier attempt on any
    #    worker left one; the work dir holds a scratch copy); with
    #    num_processes > 1 torch elastic runs the ranks and rank 0 reports and saves the adapter
    #    (worker/distributed.py); this process waits for them
    adapter_dir = workdir / "adapter"
    if spec.world_size > 1:
        from worker import distributed

        result = distributed.run(
            spec.num_processes,
            device=device,
            settings=settings,
            job=job,
            bone_config=config,
            examples=train_examples,
            eval_examples=eval_examples,
            checkpoint_dir=workdir / "checkpoints",
            adapter_dir=adapter_dir,
            adapter_name=TRAINING_SLOT,
            node=node,
        )
        if result is None:
            return None
        reporter.progress = dict(store.get(job.id).progress.model_dump())  # rank 0 wrote it meanwhile
    else:
        publisher = CheckpointPublisher(store, settings, job, config)
        result = train(
            bone_model,
            tokenizer,
            train_examples,
            spec,
            device=device,
            eval_examples=eval_examples,
            on_step=reporter.on_step,
            on_event=publisher.wrap(reporter.on_event),
            should_stop=reporter.should_stop,
            checkpoint_dir=workdir / "checkpoints",
            checkpoints_kept=settings.checkpoints_kept,
            shared_checkpoints=ResumeStore.from_settings(settings).for_job(job.id),
            adapter_name=TRAINING_SLOT,
        )
        bone_model.save_pretrained(adapter_dir, adapter_name=TRAINING_SLOT)
    return _Trained(
        result, config, adapter_dir, len(train_examples), len(eval_examples), data.summary.truncated, reporter
    )


def mark_failed(conn: redis.Redis, job_id: str, reason: str) -> None:
    """Fail a job the task could not finish itself (its process died), unless it is already final."""
    try:
        _finish(JobStore(conn), job_id, JobStatus.FAILED, reason, error=reason)
    except ServiceError as exc:  # e.g. NotFound: an RQ job that is not one of ours
        log.warning("could not mark job %s failed: %s", job_id, exc)


# --- nodes 1..M-1 of a multi-node job ----------------------------------------------------------------------
def run_node(job_id: str, attempt: int, slot: int) -> str:
    """The RQ task of nodes 1..M-1: join attempt ``attempt`` of the job as node ``slot``."""
    settings = current_settings()
    context = job_id_var.set(job_id)
    conn = redis.Redis.from_url(settings.redis_url)
    store = JobStore(conn)
    try:
        gang = joinable(conn, store, job_id, attempt)
        if gang is None:
            log.info("job %s: attempt %d is over; node task %d has nothing to join", job_id, attempt, slot)
            return "skipped"
        name = worker_name() or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        beat = MemberBeat(settings, job_id, slot, name)
        if not beat.claim():
            log.info("job %s: node %d is already taken by a live worker", job_id, slot)
            return "skipped"
        with beat:
            node = Node(slot, gang["nodes"], gang["endpoint"], node_address(settings))
            return run_as_node(store, settings, store.get(job_id), node)
    finally:
        job_id_var.reset(context)
        conn.close()
