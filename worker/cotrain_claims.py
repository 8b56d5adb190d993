"""Which queued jobs may join a co-training group, and taking them off the queue (issue 19, points 3 and 4).

A worker that RQ handed a job (the *leader*) may train up to ``BONE_COTRAIN_MAX_JOBS`` jobs together in one
forward/backward on one copy of the base. ``claim_companions`` picks the others from the leader's RQ queue:

* **compatible** (``incompatibility``): same base model and queue, one process on one node, no sharding, no
  gradient checkpointing, no trained base biases (every member shares the base), and the same sequence
  bucket (below). The dtype and device are the worker's own (settings), so they are equal for every member.
* **FIFO**, over the first ``SCAN_LIMIT`` entries of the queue: a bounded scan, whatever the queue's depth.
* **not cancelled**: a job whose cancel was requested is left to RQ (``_start`` records it cancelled).
* **per-owner share** (``settings.cotrain_owner_seats``, BONE_COTRAIN_OWNER_SHARE): a first pass gives no
  owner more seats than its share, so owner A's ten queued jobs cannot keep owner B's two out of the group.
  Seats left after that pass go to the remaining compatible jobs in FIFO order: an idle seat helps no one
  (with keys off every job has the same owner, None, and still fills the group).
* **time** (``settings.cotrain_max_slowdown``, worker/cotrain_cost.py): a job joins only while the group's
  iteration, as timed on the worker's device, stays within that multiple of the smallest member's iteration
  alone; ``cost_of`` measures it (once per worker, and only when a compatible job waits).
* **memory**: with a device bound (the worker's advertised device memory, core.memory_estimate.device_memory),
  the group's estimate (the base once + each member's own bytes) stays within it; a job that does not fit is
  skipped (it stays queued and runs as a leader elsewhere) and smaller ones behind it may still join.

Sequence bucket: a group's micro-batch is one padded tensor, as long as its longest row, so a member's rows
cost the group's padded length, not their own. Members share the leader's power-of-two bucket of
``max_seq_length`` (e.g. 257..512): padding to the longest member costs any member at most 2x, and each
member's estimate is scaled from its own ``max_seq_length`` to the bucket's top, which bounds the padded
length whatever rows arrive.

Claims are atomic and survive the claimer's death (core/claims.py): the caller must start each claimed job
(``worker.tasks._start`` + its Heartbeat) and then ``core.claims.release`` the ids; a job it decides not to run
goes back with ``give_back``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence

import redis
from pydantic import ValidationError

from core import claims
from core.jobs import STORED, Job, JobStatus
from core.jobstore import JobStore
from core.settings import Settings
from worker.cotrain_cost import StepCost, admits

log = logging.getLogger(__name__)

SCAN_LIMIT = 256  # queue entries one claim looks at: bounded work per step boundary whatever the depth


def seq_bucket(max_seq_length: int) -> int:
    """The power of two at or above ``max_seq_length``: members of one group share it."""
    return 1 << (max_seq_length - 1).bit_length()


def solo_reason(job: Job) -> str | None:
    """Why ``job`` cannot share a forward with any other job, or None."""
    spec = job.training
    if job.train_alone:
        return "a co-training group it was in failed a shared step (it trains alone since)"
    if spec.num_nodes > 1:
        return f"it runs on {spec.num_nodes} nodes (training.num_nodes)"
    if spec.num_processes > 1:
        return f"it runs {spec.num_processes} processes (training.num_processes)"
    if spec.sharding != "none":
        return f"it shards the base (training.sharding={spec.sharding!r})"
    if spec.gradient_checkpointing:
        return "it recomputes activations (training.gradient_checkpointing)"
    if job.bone.bias != "none":
        return f"it trains the base model's biases (bone.bias={job.bone.bias!r}), which a group shares"
    return None


def incompatibility(leader: Job, other: Job) -> str | None:
    """Why ``other`` cannot share ``leader``'s forward, or None when it can."""
    for who, job in (("the leader", leader), ("the job", other)):
        reason = solo_reason(job)
        if reason is not None:
            return f"{who}: {reason}"
    if other.base_model != leader.base_model:
        return f"another base model ({other.base_model!r}, not {leader.base_model!r})"
    if other.queue != leader.queue:
        return f"another queue ({other.queue!r}, not {leader.queue!r})"
    mine, theirs = seq_bucket(leader.training.max_seq_length), seq_bucket(other.training.max_seq_length)
    if mine != theirs:
        return (
            f"training.max_seq_length={other.training.max_seq_length} is outside the leader's sequence bucket "
            f"{mine // 2 + 1}..{mine}"
        )
    return None


def own_bytes(job: Job, padded_length: int) -> int | None:
    """What ``job`` adds to a group's device memory besides the shared base: its POST /jobs estimate less the
    base, scaled from its own ``max_seq_length`` to the group's padded length (an over-estimate of the Bone
    blocks' part, which does not grow with it). None when the record carries no estimate."""
    if job.estimated_device_bytes is None or job.estimated_base_bytes is None:
        return None
    own = max(0, job.estimated_device_bytes - job.estimated_base_bytes)
    return math.ceil(own * padded_length / job.training.max_seq_length)


def group_bytes(group: Sequence[Job]) -> int | None:
    """The estimate of a whole group (the first is the leader): its base once + every member's own bytes."""
    padded = seq_bucket(group[0].training.max_seq_length)
    parts = [own_bytes(job, padded) for job in group]
    if group[0].estimated_base_bytes is None or any(p is None for p in parts):
        return None
    return group[0].estimated_base_bytes + sum(p for p in parts if p is not None)


def claim_companions(
    conn: redis.Redis,
    settings: Settings,
    leader: Job,
    already: Sequence[Job],
    max_jobs: int,
    device_memory_bytes: int | None,
    cost_of: Callable[[], StepCost | None] | None = None,
) -> list[str]:
    """Claim queued jobs to train with ``leader`` and ``already`` (the group's other running members): at most
    ``max_jobs`` members in all, within ``device_memory_bytes`` (None: no device bound, only the count) and, given
    ``cost_of`` (called once, only when a compatible job waits; None from it: nobody joins), within
    ``settings.cotrain_max_slowdown`` of each member's iteration time alone. Returns
    the claimed ids in queue order; each is off the RQ queue and must be started by the caller (then
    ``core.claims.release``) or handed back (``give_back``). ``leader``'s heartbeat vouches for the claims:
    it must be live (the janitor puts a claim back once it is gone)."""
    group = [leader, *already]
    seats = max_jobs - len(group)
    if seats <= 0 or solo_reason(leader) is not None:
        return []
    store = JobStore(conn)
    queue_name = leader.queue or settings.queue_name
    in_group = {job.id for job in group}
    ids: list[str] = []
    for raw in conn.lrange(claims.queue_key(queue_name), 0, SCAN_LIMIT - 1):
        job_id = raw.decode()
        # Training tasks' RQ ids are their records' ids (core.queueing); node tasks and evaluations differ.
        if job_id.startswith("job-") and job_id not in in_group and job_id not in ids:
            ids.append(job_id)
    if not ids:
        return []
    with conn.pipeline(transaction=False) as pipe:
        pipe.mget([store.key(i) for i in ids])
        for job_id in ids:
            pipe.exists(store.key(job_id) + ":cancel")
        raws, *cancels = pipe.execute()
    candidates: list[Job] = []
    for raw, cancelled in zip(raws, cancels):
        if raw is None or cancelled:
            continue
        try:
            job = Job.model_validate_json(raw, context=STORED)
        except ValidationError:
            continue  # an unreadable record is RQ's worker's to fail, with its message
        if job.status is JobStatus.QUEUED and incompatibility(leader, job) is None:
            candidates.append(job)
    if not candidates:
        return []

    padded = seq_bucket(leader.training.max_seq_length)
    used: int | None = None
    if device_memory_bytes is not None:
        used = group_bytes(group)
        if used is None:
            log.info("job %s: no memory estimate for its group; co-training only within a known bound", leader.id)
            return []
    cost: StepCost | None = None
    if cost_of is not None and settings.cotrain_max_slowdown > 0:
        cost = cost_of()
        if cost is None:
            log.info("job %s: no measure of the group's step time on this device; no companion", leader.id)
            return []
    rows = [job.training.batch_size for job in group]  # one process each: its micro-batch is its batch_size
    owners = Counter(job.owner for job in group)
    share = settings.cotrain_owner_seats
    taken: list[Job] = []
    tried: set[str] = set()
    slower: list[str] = []

    def take(job: Job) -> None:
        nonlocal used
        need = 0
        if used is not None and device_memory_bytes is not None:
            own = own_bytes(job, padded)
            if own is None or used + own > device_memory_bytes:
                return  # does not fit (or cannot be judged): it stays queued, a smaller job may still fit
            need = own
        if cost is not None and not admits(cost, rows, job.training.batch_size, settings.cotrain_max_slowdown):
            slower.append(job.id)
            return  # the group would slow someone past the bound: it stays queued (a smaller job may still fit)
        tried.add(job.id)
        if claims.claim(conn, queue_name, job.id, claimer=leader.id):
            taken.append(job)
            rows.append(job.training.batch_size)
            owners[job.owner] += 1
            if used is not None:
                used += need

    for fair in (True, False):  # within the per-owner share first; then the seats nobody else wanted
        for job in candidates:
            if len(taken) >= seats:
                break
            if job.id not in tried and not (fair and owners[job.owner] >= share):
                take(job)
    if slower and cost is not None:
        log.info(
            "job %s: %d queued job(s) left out: the group's iteration would take more than %.2gx the smallest "
            "member's alone on this device (BONE_COTRAIN_MAX_SLOWDOWN; measured %.3g s at %d rows, %.3g s at %d)",
            leader.id,
            len(set(slower)),
            settings.cotrain_max_slowdown,
            cost.measured_s[0],
            cost.measured_rows,
            cost.measured_s[1],
            2 * cost.measured_rows,
        )
        store.record_cotrain_left_out(len(set(slower)))
    order = {job_id: n for n, job_id in enumerate(ids)}
    return sorted((job.id for job in taken), key=order.__getitem__)


def give_back(conn: redis.Redis, settings: Settings, job_ids: Sequence[str], reason: str) -> list[str]:
    """Return claimed jobs the caller will not run to the front of their queue (those still queued)."""
    # Last first: each goes to the front, so they end up in their original order.
    back = [job_id for job_id in reversed(job_ids) if claims.put_back(conn, settings, job_id, reason)]
    return back[::-1]
