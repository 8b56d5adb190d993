"""Co-training claims on the real Redis and RQ: which queued jobs a worker takes to train with its own, taken
atomically, fairly, within memory, and never lost when the claimer dies (worker/cotrain_claims.py, core/claims.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob

from core import claims, janitor
from core.jobs import BoneSpec, Job, JobStatus, TrainingSpec
from core.jobstore import JobStore
from core.queueing import TRAINING_TASK, enqueue
from core.settings import Settings
from worker.cotrain_claims import claim_companions, give_back, incompatibility, seq_bucket
from worker.cotrain_cost import StepCost

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[2]


def queue_job(conn, settings, *, owner=None, base_model="embedded", bone=None, est=(3 * GIB, 2 * GIB), **training):
    """A job stored and queued as POST /jobs does it: record and RQ entry in one MULTI/EXEC."""
    job = Job(
        id=Job.new_id(),
        adapter_name="a",
        base_model=base_model,
        dataset={"records": 1},
        bone=BoneSpec(**(bone or {})),
        training=TrainingSpec(**training),
        owner=owner,
        queue=settings.queue_name,
        estimated_device_bytes=est[0] if est else None,
        estimated_base_bytes=est[1] if est else None,
    )
    with conn.pipeline(transaction=True) as pipe:
        pipe.multi()
        JobStore(conn).create(job, records=[{"text": "x"}], pipeline=pipe)
        enqueue(conn, settings, TRAINING_TASK, job.id, queue=settings.queue_name, pipeline=pipe)
        pipe.execute()
    return job


def handed_out(conn, settings) -> Job:
    """The job RQ's own dequeue (what an RQ worker runs) hands out next, as the leader of a group."""
    rq_job, _ = Queue.dequeue_any([Queue(settings.queue_name, connection=conn)], None, connection=conn)
    return JobStore(conn).get(rq_job.id)


def rq_order(conn, settings) -> list[str]:
    return Queue(settings.queue_name, connection=conn).job_ids


def drain(conn, settings) -> list[str]:
    """Every id RQ's dequeue still hands out, in order."""
    out = []
    while (got := Queue.dequeue_any([Queue(settings.queue_name, connection=conn)], None, connection=conn)) is not None:
        out.append(got[0].id)
    return out


def test_compatible_jobs_are_claimed_in_fifo_order_up_to_max_jobs(redis_conn, settings):
    jobs = [queue_job(redis_conn, settings) for _ in range(10)]
    leader = handed_out(redis_conn, settings)
    assert leader.id == jobs[0].id

    got = claim_companions(redis_conn, settings, leader, [], 4, None)

    assert got == [j.id for j in jobs[1:4]]
    assert rq_order(redis_conn, settings) == [j.id for j in jobs[4:]]
    assert set(claims.claimed_ids(redis_conn)) == set(got)
    for job_id in got:  # RQ keeps nothing of a claimed job: no worker runs it, no cleanup reports it
        with pytest.raises(NoSuchJobError):
            RQJob.fetch(job_id, connection=redis_conn)
        assert JobStore(redis_conn).get(job_id).status is JobStatus.QUEUED  # until the caller starts it
    # A group already holding 4 members (leader + 3) has no seat left; joining members count
    assert claim_companions(redis_conn, settings, leader, [JobStore(redis_conn).get(i) for i in got], 4, None) == []
    # ... and with max_jobs = 1 (co-training off) nothing is ever claimed
    assert claim_companions(redis_conn, settings, leader, [], 1, None) == []
    assert drain(redis_conn, settings) == [j.id for j in jobs[4:]]


@pytest.mark.parametrize(
    "change,words",
    [
        ({"base_model": "other/model"}, "another base model"),
        ({"num_processes": 2}, "training.num_processes"),
        ({"num_nodes": 2}, "training.num_nodes"),
        ({"sharding": "full"}, "training.sharding"),
        ({"gradient_checkpointing": True}, "training.gradient_checkpointing"),
        ({"max_seq_length": 1024}, "sequence bucket"),
        ({"max_seq_length": 256}, "sequence bucket"),
        ({"bone": {"bias": "all"}}, "bone.bias"),
    ],
)
def test_incompatible_jobs_name_why(redis_conn, settings, change, words):
    leader = queue_job(redis_conn, settings, max_seq_length=512)
    other = queue_job(redis_conn, settings, **change)
    assert words in incompatibility(leader, other)
    assert words in incompatibility(other, leader)  # the rule is symmetric in what it refuses
    assert incompatibility(leader, queue_job(redis_conn, settings, max_seq_length=300, bone={"r": 16})) is None


def test_incompatible_and_cancelled_jobs_stay_queued_for_a_normal_worker(redis_conn, settings):
    leader_job = queue_job(redis_conn, settings)
    odd = [
        queue_job(redis_conn, settings, base_model="other/model"),
        queue_job(redis_conn, settings, gradient_checkpointing=True),
        queue_job(redis_conn, settings, max_seq_length=2048),
    ]
    good = queue_job(redis_conn, settings, bone={"init_weights": "bat"}, learning_rate=1e-3)
    cancelled = queue_job(redis_conn, settings)
    JobStore(redis_conn).request_cancel(cancelled.id)  # the API writes the flag first, then cancels RQ's job
    other_queue = queue_job(redis_conn, settings)
    redis_conn.lrem(claims.queue_key(settings.queue_name), 1, other_queue.id)  # a job waiting elsewhere
    Queue("elsewhere", connection=redis_conn).enqueue(TRAINING_TASK, other_queue.id, job_id=other_queue.id)

    leader = handed_out(redis_conn, settings)
    assert leader.id == leader_job.id
    assert claim_companions(redis_conn, settings, leader, [], 8, None) == [good.id]
    assert drain(redis_conn, settings) == [j.id for j in odd] + [cancelled.id]


def test_an_owner_cannot_take_every_seat(redis_conn, settings):
    assert settings.cotrain_owner_seats == 4  # half of the default 8
    a_jobs = [queue_job(redis_conn, settings, owner="a") for _ in range(10)]
    b_jobs = [queue_job(redis_conn, settings, owner="b") for _ in range(6)]
    leader = handed_out(redis_conn, settings)

    got = claim_companions(redis_conn, settings, leader, [], 8, None)

    # a's leader + 3 more (its share of 4), then b's first 4 (b's share), queue order kept
    assert got == [j.id for j in a_jobs[1:4]] + [j.id for j in b_jobs[:4]]
    assert rq_order(redis_conn, settings) == [j.id for j in a_jobs[4:]] + [j.id for j in b_jobs[4:]]


def test_seats_nobody_else_wants_go_to_the_owner_over_its_share(redis_conn, settings):
    a_jobs = [queue_job(redis_conn, settings, owner="a") for _ in range(10)]
    b_jobs = [queue_job(redis_conn, settings, owner="b") for _ in range(2)]
    leader = handed_out(redis_conn, settings)

    got = claim_companions(redis_conn, settings, leader, [], 8, None)

    # b's two get in ahead of a's jobs queued before them; the two seats left go to a, in queue order
    assert set(got) == {j.id for j in a_jobs[1:6]} | {j.id for j in b_jobs}
    assert rq_order(redis_conn, settings) == [j.id for j in a_jobs[6:]]


def test_an_owner_share_setting_binds(redis_conn, settings):
    settings = settings.model_copy(update={"cotrain_owner_share": 1})
    a_jobs = [queue_job(redis_conn, settings, owner="a") for _ in range(3)]
    b_jobs = [queue_job(redis_conn, settings, owner="b") for _ in range(3)]
    c_job = queue_job(redis_conn, settings, owner="c")
    leader = handed_out(redis_conn, settings)
    # seats: 3 besides the leader; one each for b and c first, then a's next in queue order
    assert claim_companions(redis_conn, settings, leader, [], 4, None) == [a_jobs[1].id, b_jobs[0].id, c_job.id]


def test_the_group_stays_within_the_device_memory(redis_conn, settings):
    # base 2 GiB once; each member adds its own 1 GiB (2 GiB for the big one)
    leader_job = queue_job(redis_conn, settings)
    small = [queue_job(redis_conn, settings) for _ in range(2)]
    big = queue_job(redis_conn, settings, est=(4 * GIB, 2 * GIB))
    late_small = queue_job(redis_conn, settings)
    unknown = queue_job(redis_conn, settings, est=None)  # a record without an estimate cannot be judged
    leader = handed_out(redis_conn, settings)
    assert leader.id == leader_job.id

    # 2 + 1 (leader) + 1 + 1 = 5 GiB; the big one would make 7: it is skipped, the later small one fits
    got = claim_companions(redis_conn, settings, leader, [], 8, int(6 * GIB))
    assert got == [small[0].id, small[1].id, late_small.id]
    assert rq_order(redis_conn, settings) == [big.id, unknown.id]
    # without a known bound only the count holds
    assert claim_companions(redis_conn, settings, leader, [], 8, None) == [big.id, unknown.id]


def test_shorter_members_are_counted_at_the_groups_padded_length(redis_conn, settings):
    leader_job = queue_job(redis_conn, settings, max_seq_length=512)
    short = queue_job(redis_conn, settings, max_seq_length=257)  # own 1 GiB at 257 tokens: ~2 GiB at 512
    leader = handed_out(redis_conn, settings)
    assert seq_bucket(512) == 512 == seq_bucket(257)
    assert claim_companions(redis_conn, settings, leader, [], 8, int(4.5 * GIB)) == []  # 2 + 1 + 1.99 > 4.5
    assert claim_companions(redis_conn, settings, leader, [], 8, 5 * GIB) == [short.id]
    assert leader_job.id == leader.id


def test_no_member_is_slowed_past_the_bound(redis_conn, settings):
    # t(rows) = 10 + rows seconds: leader (2 rows) alone 12 s; + a 2-row job 14 s (1.17x); + another 16 s (1.33x)
    cost = StepCost(fixed_s=10.0, per_row_s=1.0, measured_rows=2, measured_s=(12.0, 14.0))
    measured = []

    def cost_of():
        measured.append(1)
        return cost

    leader_job = queue_job(redis_conn, settings, batch_size=2)
    others = [queue_job(redis_conn, settings, batch_size=2) for _ in range(2)]
    one_row = queue_job(redis_conn, settings, batch_size=1)  # 15 s vs its own 11 s alone: 1.36x, left out too
    leader = handed_out(redis_conn, settings)
    assert leader.id == leader_job.id
    bounded = settings.model_copy(update={"cotrain_max_slowdown": 1.2})
    assert claim_companions(redis_conn, bounded, leader, [], 8, None, cost_of=cost_of) == [others[0].id]
    assert measured == [1]  # measured once per claim
    assert rq_order(redis_conn, settings) == [others[1].id, one_row.id]  # left out: still queued, in order
    assert JobStore(redis_conn).conn.hget("bone:metrics:cotrain", "left_out_slowdown_total") == b"2"
    # a running group: its members' rows count (leader + others[0] = 4 rows; +2 -> 16 s = 1.33x)
    assert claim_companions(redis_conn, bounded, leader, [others[0]], 8, None, cost_of=cost_of) == []
    # 0: no bound, and nothing measured
    unbounded = settings.model_copy(update={"cotrain_max_slowdown": 0})
    got = claim_companions(redis_conn, unbounded, leader, [others[0]], 8, None, cost_of=lambda: 1 / 0)
    assert got == [others[1].id, one_row.id]


def test_no_measure_means_no_companion(redis_conn, settings):
    queue_job(redis_conn, settings)
    other = queue_job(redis_conn, settings)
    leader = handed_out(redis_conn, settings)
    bounded = settings.model_copy(update={"cotrain_max_slowdown": 1.2})
    assert claim_companions(redis_conn, bounded, leader, [], 8, None, cost_of=lambda: None) == []
    assert rq_order(redis_conn, settings) == [other.id]
    # nobody compatible waiting: nothing is measured
    drain(redis_conn, settings)
    assert claim_companions(redis_conn, bounded, leader, [], 8, None, cost_of=lambda: 1 / 0) == []


def race(redis_url: str, settings: Settings, leaders: list[Job]) -> dict[str, list[str]]:
    """Three claimers (each its own connection, joining at four step boundaries) and RQ's dequeue, started
    together on one queue: what each got."""
    results: dict[str, list[str]] = {}
    start = threading.Barrier(len(leaders) + 1)

    def claimer(leader: Job) -> None:
        conn = redis.Redis.from_url(redis_url)
        store = JobStore(conn)
        start.wait()
        mine: list[str] = []
        for _ in range(4):
            mine += claim_companions(conn, settings, leader, [store.get(i) for i in mine], 8, None)
            claims.release(conn, mine)
        results[leader.id] = mine

    def rq_worker() -> None:
        conn = redis.Redis.from_url(redis_url)
        start.wait()
        results["rq"] = drain(conn, settings)

    threads = [threading.Thread(target=claimer, args=(leader,)) for leader in leaders]
    threads.append(threading.Thread(target=rq_worker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_racing_claimers_and_rq_never_share_a_job(redis_url, settings):
    setup = redis.Redis.from_url(redis_url)
    for _ in range(3):  # a few rounds: the interleavings differ
        setup.flushdb()
        queued = [queue_job(setup, settings) for _ in range(40)]
        leaders = [handed_out(setup, settings) for _ in range(3)]
        results = race(redis_url, settings, leaders)
        everyone = [job_id for ids in results.values() for job_id in ids]
        assert len(everyone) == len(set(everyone))  # nobody got a job twice
        assert set(everyone) == {j.id for j in queued} - {leader.id for leader in leaders}  # none lost
        assert all(len(results[leader.id]) <= 7 for leader in leaders)


CLAIMER = """
import os, sys, redis
from core.jobstore import JobStore
from core.settings import Settings
from worker.cotrain_claims import claim_companions
url, data_dir = sys.argv[1], sys.argv[2]
conn = redis.Redis.from_url(url)
settings = Settings(redis_url=url, data_dir=data_dir, heartbeat_ttl_s=1)
store = JobStore(conn)
leader = store.get(sys.argv[3])
store.beat(leader.id, 1, 3.0)  # the leader's heartbeat vouches for this process
got = claim_companions(conn, settings, leader, [], 8, None)
print(" ".join(got), flush=True)
os._exit(0)  # dies before starting what it claimed: no cleanup of any kind
"""


def test_a_claim_whose_claimer_died_goes_back_to_the_queue(redis_url, redis_conn, tmp_path):
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, heartbeat_ttl_s=1)
    jobs = [queue_job(redis_conn, settings) for _ in range(4)]
    leader = handed_out(redis_conn, settings)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CLAIMER, redis_url, str(tmp_path), leader.id],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
        check=True,
    )
    claimed = out.stdout.split()
    assert claimed == [j.id for j in jobs[1:]] and rq_order(redis_conn, settings) == []

    # While the claimer's heartbeat lives (it may be slow, not dead), its claims are left alone
    assert janitor.sweep(redis_conn, settings, now=time.time() + 2) == []
    time.sleep(3.2)  # the claimer's heartbeat expires
    assert sorted(janitor.sweep(redis_conn, settings)) == sorted(claimed)

    assert rq_order(redis_conn, settings) == claimed  # at the front, in their order
    assert claims.claimed_ids(redis_conn) == []
    store = JobStore(redis_conn)
    assert all(store.get(i).status is JobStatus.QUEUED for i in claimed)
    assert "co-training" in store.events(claimed[0])[-1]["message"]
    assert drain(redis_conn, settings) == claimed  # and RQ hands each out again (its job hash is back)


def test_started_or_returned_claims_are_never_requeued(redis_url, redis_conn, tmp_path):
    settings = Settings(redis_url=redis_url, data_dir=tmp_path, heartbeat_ttl_s=1)
    jobs = [queue_job(redis_conn, settings) for _ in range(4)]
    leader = handed_out(redis_conn, settings)
    store = JobStore(redis_conn)
    store.beat(leader.id, 1, 30)
    got = claim_companions(redis_conn, settings, leader, [], 8, None)
    assert got == [j.id for j in jobs[1:]]
    # the caller started the first (as worker.tasks._start does) but died before releasing the claim
    store.transition(got[0], [JobStatus.QUEUED], status=JobStatus.RUNNING, started_at=time.time(), attempts=1)
    store.beat(got[0], 1, 30)
    # ... and hands the last back itself: it goes to the front of the queue at once
    assert give_back(redis_conn, settings, got[2:], "not enough memory after all") == got[2:]
    assert rq_order(redis_conn, settings) == got[2:]

    store.clear_heartbeat(leader.id)
    time.sleep(1.2)
    assert janitor.sweep(redis_conn, settings, now=time.time()) == [got[1]]
    assert rq_order(redis_conn, settings) == [got[1], got[2]]
    assert claims.claimed_ids(redis_conn) == []
    assert store.get(got[0]).status is JobStatus.RUNNING  # the running one is the running sweep's business


def test_the_caller_starts_claimed_jobs_and_a_cancel_meanwhile_wins(redis_url, redis_conn, tmp_path, task_settings):
    from worker.tasks import _start  # the transition every started job goes through

    settings = task_settings.model_copy(update={"heartbeat_ttl_s": 1})
    jobs = [queue_job(redis_conn, settings) for _ in range(3)]
    leader = handed_out(redis_conn, settings)
    store = JobStore(redis_conn)
    got = claim_companions(redis_conn, settings, leader, [], 8, None)
    assert got == [jobs[1].id, jobs[2].id]
    # POST /jobs/{id}/cancel on a claimed job: the flag, RQ's job (already gone), then queued -> cancelled
    store.request_cancel(got[1])
    with pytest.raises(NoSuchJobError):
        RQJob.fetch(got[1], connection=redis_conn)
    store.transition(got[1], [JobStatus.QUEUED], status=JobStatus.CANCELLED, finished_at=time.time())

    started = _start(store, got[0])
    assert started is not None and started.status is JobStatus.RUNNING and started.attempts == 1
    assert _start(store, got[1]) is None and store.get(got[1]).status is JobStatus.CANCELLED
    time.sleep(1.2)  # neither the leader (never beating here) nor the claim vouch any longer
    store.beat(got[0], 1, 30)  # the started one has its own heartbeat (worker.heartbeat.Heartbeat)
    assert janitor.sweep(redis_conn, settings) == []  # nothing to put back: one runs, one is final
    assert claims.claimed_ids(redis_conn) == [] and rq_order(redis_conn, settings) == []
