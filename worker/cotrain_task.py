"""A co-training group inside the RQ task (worker/tasks.py): the job RQ handed out leads, companions join.

The leader reads its rows first (a bad file fails before anything else), then claims compatible queued jobs
(worker/cotrain_claims.py: off the RQ queue, atomically, within BONE_COTRAIN_MAX_JOBS, the per-owner share
and the device memory). None claimed: the leader trains alone exactly as a job always did
(``steps._train``). Otherwise each claimed job is started as its own RQ task would start it (``_start``:
running, attempts + 1, its status event, and its own heartbeat, so the janitor re-queues it if this process
dies), its rows are read and tokenized by the same code as a lone job's, and all of them train in one group
(worker/cotrain.py) on ONE copy of the base. Every few seconds, while the group has room, the leader claims
more at a step boundary. Each member is published and recorded (``_record_outcome``) the moment it leaves,
whatever the others do; a member that fails to prepare fails alone.

Visible: every step event of a member says its share of the step's time (``share_s``: its rows over the
iteration's rows x the iteration's seconds, summed over the step), its rows and the group's, and whom it
trained with (its own owner's job ids; other owners' only as a count); the record's ``co_trained_with``
is kept by ``JobStore.add_co_trained_with`` and /metrics counts groups and rows.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from core import claims
from core.errors import Conflict, NotFound
from core.jobs import Job, JobStatus
from core.jobstore import JobStore
from core.paths import redact_server_paths
from core.settings import Settings
from core.storage.resume_state import ResumeStore
from worker import job_steps as steps
from worker import model_cache
from worker.cotrain import GroupStepFailed, Member, cotrain
from worker.cotrain_claims import claim_companions, solo_reason
from worker.cotrain_cost import StepCost
from worker.data import tokenize_rows
from worker.heartbeat import Heartbeat
from worker.publish import CheckpointPublisher
from worker.tokenized import example_lengths
from worker.train import TrainResult, precision

log = logging.getLogger(__name__)
POLL_EVERY_S = 3.0  # how often a group with room looks for more companions (at a step boundary)


def leads(settings: Settings, job: Job) -> bool:
    """Does ``job`` look for companions? Co-training on, and the job itself can share a forward."""
    return settings.cotrain_max_jobs > 1 and solo_reason(job) is None


def lead(store: JobStore, settings: Settings, leader: Job, workdir: Path, loaded: steps._Loaded) -> bool:
    """Claim companions for ``leader`` (its rows read already) and train the group; False when none was
    claimed (the caller trains the leader alone, as always). True: every member's outcome, the leader's
    included, was recorded when it left the group."""
    device = steps.job_device(settings)
    group = Group(store, settings, leader, device)
    group.leader_rows = loaded.rows
    # fp16 with loss scaling (a GPU without bf16): one scaler cannot serve optimizers stepping at different times
    companions = group.claim() if precision(device)[1] is None else []
    if not companions:
        return False
    group.run(leader, loaded, workdir, companions)
    return True


# --- the queue side (worker/cotrain_claims.py, core/claims.py) -----------------------------------------------
def _device_memory(device: torch.device) -> int | None:
    """What the worker advertises for its device (worker.main.describe_device): the GPU's memory; None on CPU."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


# --- what sharing the batch costs on this device (worker/cotrain_cost.py) -----------------------------------
COST_KEY = "bone:cotrain:step_cost"  # hash: (host, device, base, dtype, rows, length) -> StepCost as JSON
COST_TTL_S = 24 * 3600  # re-measured daily: drivers, clocks and neighbours change
SAMPLE_ROWS = 64  # rows of the leader tokenized to learn how long its padded micro-batches are
LENGTH_STEP = 64  # measured lengths are multiples of this (fewer shapes to time; the cost is near-linear in it)


def padded_length(job: Job, tokenizer: Any, rows: list[dict[str, Any]] | None) -> int:
    """How long the leader's micro-batches are once padded: the longest of a sample of its rows, tokenized as
    training will (its ``max_seq_length`` when packing, or when the sample cannot be read)."""
    spec = job.training
    if spec.packing or not rows:
        return spec.max_seq_length
    try:
        sample = tokenize_rows(rows[:SAMPLE_ROWS], tokenizer, spec.max_seq_length, format=job.dataset.format)
        longest = max(example_lengths(sample.examples), default=spec.max_seq_length)
    except Exception:  # noqa: BLE001 - the job's own tokenization reports bad rows; here the bound suffices
        return spec.max_seq_length
    # Rounded up to a multiple of LENGTH_STEP: a bounded number of shapes to measure and keep per machine
    return min(spec.max_seq_length, -(-int(longest) // LENGTH_STEP) * LENGTH_STEP)


def cached_step_cost(conn: Any, key: str, measure: Callable[[], StepCost | None]) -> StepCost | None:
    """The cost measured for ``key`` on this machine (Redis, a day), else ``measure()`` stored for next time: a
    work-horse is a fresh process per job, so an in-process cache would measure again for every group."""
    raw = conn.hget(COST_KEY, key)
    if raw is not None:
        try:
            data = json.loads(raw)
            if time.time() - data["at"] < COST_TTL_S:
                return StepCost(data["fixed_s"], data["per_row_s"], data["rows"], tuple(data["measured_s"]))
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: measure again
    cost = measure()
    if cost is not None:
        conn.hset(
            COST_KEY,
            key,
            json.dumps(
                {
                    "fixed_s": cost.fixed_s,
                    "per_row_s": cost.per_row_s,
                    "rows": cost.measured_rows,
                    "measured_s": list(cost.measured_s),
                    "at": time.time(),
                }
            ),
        )
        conn.expire(COST_KEY, COST_TTL_S)  # the hash goes a day after its last entry (stale ones are skipped)
    return cost


# --- the group ---------------------------------------------------------------------------------------------
class Group:
    """The jobs training together in this task, with what each needs beyond the loop: its heartbeat, work
    dir, reporter and what publishing it needs."""

    def __init__(self, store: JobStore, settings: Settings, leader: Job, device: torch.device) -> None:
        self.store, self.settings, self.leader, self.device = store, settings, leader, device
        self.jobs: dict[str, Job] = {}  # members training now (the leader included while it trains)
        self.known: dict[str, Job] = {}  # every member this group had (partners named after they left)
        self.beats: dict[str, Heartbeat] = {}  # companions' heartbeats (the leader's is the task's own)
        self.info: dict[str, dict[str, Any]] = {}
        self.partners: dict[str, set[str]] = {}  # partner ids already recorded per member
        self.shares: dict[str, dict[str, float]] = {}  # per member: its share of the steps' time, shared steps
        self.tokenizer: Any = None
        self.memory = _device_memory(device)
        self.started = time.monotonic()
        self.leader_rows: list[dict[str, Any]] | None = None  # the leader's rows, to learn its padded length
        self._model_and_tokenizer: tuple[torch.nn.Module, Any] | None = None
        self._cost: StepCost | None = None
        # One thread: members' outcomes are recorded in the order they left, and one upload at a time leaves the
        # link to the others' checkpoints.
        self.publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"publish-{leader.id}")
        self.publishing: list[Future[None]] = []
        self._running = False

    def model(self) -> tuple[torch.nn.Module, Any]:
        """This job's copy of the base on the device, and the tokenizer (model_cache), loaded once."""
        if self._model_and_tokenizer is None:
            self._model_and_tokenizer = model_cache.model_for_job(self.leader.base_model, self.settings, self.device)
        return self._model_and_tokenizer

    def step_cost(self) -> StepCost | None:
        """Seconds of one iteration at the leader's rows and twice them, on this device (measured once a day per
        machine, device, base and shape; the RNG and the model untouched)."""
        if self._cost is not None or self._running:
            return self._cost  # measured when the group formed (a group that runs never loads the base again)
        model, tokenizer = self.model()
        rows = self.leader.training.batch_size
        length = padded_length(self.leader, tokenizer, self.leader_rows)
        dtype = next(model.parameters()).dtype
        key = f"{socket.gethostname()}|{self.device}|{self.leader.base_model}|{dtype}|{rows}|{length}"
        self._cost = cached_step_cost(self.store.conn, key, lambda: StepCost.measure(model, rows, length, self.device))
        return self._cost

    # -- claiming and starting companions
    def claim(self) -> list[Job]:
        """Claim and start companions; returns the started ones (those cancelled meanwhile are recorded so)."""
        already = [job for job in self.jobs.values() if job.id != self.leader.id]
        try:
            ids = claim_companions(
                self.store.conn,
                self.settings,
                self.leader,
                already,
                self.settings.cotrain_max_jobs,
                self.memory,
                cost_of=self.step_cost,
            )
        except Exception:  # noqa: BLE001 - the group goes on without newcomers
            log.exception("job %s: claiming companions failed", self.leader.id)
            return []
        started: list[Job] = []
        try:
            for job_id in ids:
                started_job = steps._start(self.store, job_id)
                if started_job is None:
                    continue
                beat = Heartbeat(self.settings.redis_url, job_id, started_job.attempts, self.settings.heartbeat_ttl_s)
                self.beats[job_id] = beat.__enter__()
                started.append(started_job)
        finally:
            claims.release(self.store.conn, ids)  # started ones are running (their heartbeats vouch for them now)
        return started

    # -- the loop
    def run(self, leader: Job, loaded: Any, workdir: Path, companions: list[Job]) -> None:
        from bone import BoneModel  # heavy; only the work-horse needs it

        model, self.tokenizer = self.model()
        self._running = True
        self._model_and_tokenizer = None  # the group's BoneModel owns it from here
        self.leader_rows = None  # the leader's rows are tokenized on disk from here on
        bone_model = BoneModel(model)
        try:
            members = [m for m in [self._member(leader, workdir, loaded)] if m is not None]
            members += [m for m in (self._member(job) for job in companions) if m is not None]
            self._record_group()
            cotrain(
                bone_model,
                self.tokenizer,
                members,
                device=self.device,
                poll=self._poll,
                poll_every_s=POLL_EVERY_S,
                max_members=self.settings.cotrain_max_jobs,
                on_iteration=self._on_iteration,
            )
        finally:
            self.publisher.shutdown(wait=True)  # every member that left is recorded before the task returns
            for future in self.publishing:
                if future.exception() is not None:  # _record_outcome records failures; this is Redis gone
                    log.error(
                        "job %s: recording a member's outcome failed", self.leader.id, exc_info=future.exception()
                    )
            for job_id in list(self.beats):  # not final (this process is failing): the janitor re-queues them
                self._close_beat(job_id)
            del bone_model, model

    def _poll(self, room: int) -> list[Member]:
        if not self.jobs:
            return []  # the group is over: the last member left
        if time.monotonic() - self.started > self.settings.job_timeout_s / 2:
            return []  # the leader's RQ task runs as long as its group: no newcomers past half its timeout
        started = self.claim()
        members = [m for m in (self._member(job) for job in started) if m is not None]
        if members:
            self._record_group()
        return members

    # -- a member
    def _member(self, job: Job, workdir: Path | None = None, loaded: Any = None) -> Member | None:
        """Read and tokenize ``job``'s data as a lone job would; None (the job failed, recorded) when that fails."""
        workdir = workdir or self.settings.jobs_dir / job.id
        self.jobs[job.id] = self.known[job.id] = job
        try:
            loaded = loaded or steps._load(job, self.store, self.settings)
            data = steps._tokenize(job, self.settings, workdir, self.tokenizer, loaded)
            config = job.bone.to_config(task_type="CAUSAL_LM", base_model_name_or_path=job.base_model)
        except Exception as exc:  # noqa: BLE001 - its own failure (Cancelled too): recorded on it, the group goes on
            self._left(job, lambda failure=exc: _raise(failure))
            return None
        reporter = loaded.reporter
        self.info[job.id] = {"data": data, "config": config, "workdir": workdir, "reporter": reporter}
        publisher = CheckpointPublisher(self.store, self.settings, job, config)

        def on_step(step, total, loss, lr, grad_norm, tokens_per_s, **extra):
            shares = self.shares.setdefault(job.id, {"cotrain_share_s": 0.0, "cotrain_steps": 0})
            shares["cotrain_share_s"] += extra.get("share_s", 0.0)
            shares["cotrain_steps"] += 1 if extra.get("co_trained_with") else 0
            extra.update(self._visible_partners(job, extra.pop("co_trained_with", [])))
            reporter.on_step(step, total, loss, lr, grad_norm, tokens_per_s, **extra)

        return Member(
            key=job.id,
            config=config,
            examples=data.train_examples,
            spec=job.training,
            eval_examples=data.eval_examples,
            on_step=on_step,
            on_event=publisher.wrap(reporter.on_event),
            should_stop=reporter.should_stop,
            on_done=self._done,
            on_join=lambda trainable, total: steps._describe(job, self.store, data, trainable, total, self.device),
            checkpoint_dir=workdir / "checkpoints",
            checkpoints_kept=self.settings.checkpoints_kept,
            shared_checkpoints=ResumeStore.from_settings(self.settings).for_job(job.id),
            adapter_dir=workdir / "adapter",
        )

    def _visible_partners(self, job: Job, partner_ids: list[str]) -> dict[str, Any]:
        """Whom ``job`` trained with during a step, as its owner may see it; the record is updated when new."""
        partners = [self.known[i] for i in partner_ids if i in self.known]
        new = [p for p in partners if p.id not in self.partners.setdefault(job.id, set())]
        if new:
            self.partners[job.id].update(p.id for p in new)
            self.store.add_co_trained_with(job, new)
        same = sorted(p.id for p in partners if p.owner == job.owner)
        return {"co_trained_with": same, "co_trained_with_others": len(partners) - len(same)}

    def _done(self, member: Member, result: TrainResult | None, error: BaseException | None) -> None:
        job = self.jobs[member.key]
        if isinstance(error, GroupStepFailed):
            self._back_to_queue_alone(job, error)
            return
        if error is not None:
            self._left(job, lambda: _raise(error))
            return
        info = self.info[job.id]
        data = info["data"]
        trained = steps._Trained(
            result,  # type: ignore[arg-type]
            info["config"],
            info["workdir"] / "adapter",
            len(data.train_examples),
            len(data.eval_examples),
            data.summary.truncated,
            info["reporter"],
            {k: round(v, 3) for k, v in self.shares.get(job.id, {}).items()},
        )
        self._left(job, lambda: steps._publish(job, self.store, self.settings, trained))

    def _back_to_queue_alone(self, job: Job, error: GroupStepFailed) -> None:
        """The group's step failed, not the job: it stays running with the reason, and once its heartbeat is
        gone the janitor re-queues it (as for a gang that did not assemble: never while this task still runs it,
        never twice), to resume alone from its own newest checkpoint (``train_alone`` keeps it out of groups)."""
        reason = redact_server_paths(str(error), self.settings.data_dir)
        try:
            self.store.transition(job.id, [JobStatus.RUNNING], attempt=job.attempts, error=reason, train_alone=True)
            self.store.add_event(
                job.id, "message", f"{reason}; the job goes back to the queue to train alone, from its last checkpoint"
            )
        except (Conflict, NotFound):  # cancelled or final meanwhile: nothing to hand back
            pass
        finally:
            self.jobs.pop(job.id, None)
            self.info.pop(job.id, None)
            if job.id != self.leader.id:
                self._close_beat(job.id)
            self.store.record_cotrain_members(len(self.jobs))

    def _left(self, job: Job, work) -> None:
        """``job`` left the group: out of it at once; publishing (``work``) and recording how it ended run on the
        group's publishing thread, so the others' next steps do not wait for an upload (a 7 B model's r=64
        adapter is ~350 MB to the registry's store). Its heartbeat runs until its outcome is recorded."""
        self.jobs.pop(job.id, None)
        self.info.pop(job.id, None)
        self.store.record_cotrain_members(len(self.jobs))
        self.publishing.append(self.publisher.submit(self._record, job, work))

    def _record(self, job: Job, work) -> None:
        """Record how ``job`` ended, then let it go: heartbeat, work dir, checkpoints (once final)."""
        try:
            steps._record_outcome(self.store, self.settings, job, work)
        finally:
            if job.id != self.leader.id:  # the leader's task cleans up after its own job
                final = steps._is_final(self.store, job.id)
                self._close_beat(job.id)
                if final:
                    shutil.rmtree(self.settings.jobs_dir / job.id, ignore_errors=True)
                    steps._remove_shared_checkpoints(self.settings, job.id)

    def _close_beat(self, job_id: str) -> None:
        beat = self.beats.pop(job_id, None)
        if beat is not None:
            beat.__exit__(None, None, None)

    # -- metrics
    def _record_group(self) -> None:
        self.store.record_cotrain_group(len(self.jobs))

    def _on_iteration(self, rows: dict[str, int], seconds: float) -> None:
        self.store.record_cotrain_rows(rows)


def _raise(exc: BaseException):
    raise exc
