"""A job across two machines (``training.num_nodes = 2`` x ``processes_per_node = 2``), on one machine: two
``bone-server worker`` processes with data dirs of their own and a shared registry, each running two gloo
processes over 127.0.0.1. Its losses match the same job on one process; with one node's worker SIGKILLed mid-job,
the surviving node's agent restarts the group, a replacement worker takes the lost node's place, and the job
succeeds from its last checkpoint."""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx
import pytest
import redis

from tests.e2e.conftest import new_service, running
from tests.e2e.test_resume import events, kill_worker
from tests.e2e.test_service import wait_for

pytestmark = pytest.mark.slow

RECORDS = [{"prompt": f"Word {i}?\n", "completion": f"w{i} " * 3} for i in range(12)]
RECIPE = {"batch_size": 4, "learning_rate": 5e-3, "seed": 5, "max_seq_length": 64}
# Short timeouts so a lost node is noticed in seconds; the node address every "machine" here is reached at.
NODE_ENV = {
    "BONE_NODE_ADDRESS": "127.0.0.1",
    "BONE_RENDEZVOUS_TIMEOUT_S": "120",
    "BONE_HEARTBEAT_TTL_S": "5",
    "BONE_JANITOR_INTERVAL_S": "1",
}


@contextmanager
def two_machines(tmp_path, redis_url, shared_models_dir):
    """Machine 1 runs the API and a worker; machine 2 a worker; the registry is machine 1's, shared."""
    first = new_service(tmp_path, redis_url, shared_models_dir, "machine-1", **NODE_ENV)
    registry = str(first.data_dir / "adapters")
    second = new_service(tmp_path, redis_url, shared_models_dir, "machine-2", BONE_REGISTRY_URL=registry, **NODE_ENV)
    with running(first):
        second.start("worker-2", "worker")
        try:
            yield first, second
        finally:
            second.stop()


def submit(client: httpx.Client, name: str, **training) -> str:
    reply = client.post(
        "/jobs", json={"adapter_name": name, "dataset": {"records": RECORDS}, "training": {**RECIPE, **training}}
    )
    assert reply.status_code == 202, reply.text
    return reply.json()["id"]


def step_losses(client: httpx.Client, job_id: str) -> dict[int, float]:
    return {e["data"]["step"]: e["data"]["loss"] for e in events(client, job_id) if e["type"] == "step"}


def test_two_nodes_of_two_processes_match_one_process(tmp_path, redis_url, shared_models_dir):
    with (
        two_machines(tmp_path, redis_url, shared_models_dir) as (first, _),
        httpx.Client(base_url=first.url, timeout=60) as client,
    ):
        one = wait_for(client, submit(client, "one", max_steps=6), {"succeeded", "failed", "cancelled"})
        assert one["status"] == "succeeded", first.logs()
        job_id = submit(client, "gang", max_steps=6, num_nodes=2, processes_per_node=2)
        gang = wait_for(client, job_id, {"succeeded", "failed", "cancelled"})
        assert gang["status"] == "succeeded", (gang, first.logs())
        assert gang["attempts"] == 1 and gang["metrics"]["num_nodes"] == 2 and gang["metrics"]["num_processes"] == 2
        assert gang["training"]["num_nodes"] == 2 and gang["training"]["num_processes"] == 2
        l1, l4 = step_losses(client, one["id"]), step_losses(client, job_id)
        assert sorted(l4) == sorted(l1) == list(range(1, 7))
        assert [l4[s] for s in sorted(l4)] == pytest.approx([l1[s] for s in sorted(l1)], rel=1e-5), (l1, l4)
        assert gang["metrics"]["train_loss"] == pytest.approx(one["metrics"]["train_loss"], rel=1e-5)
        assert client.get("/adapters/gang").status_code == 200
        conn = redis.Redis.from_url(redis_url)
        assert not conn.exists(f"bone:job:{job_id}:gang")  # node 0 closed the gang


def test_a_node_killed_mid_job_is_replaced_and_the_job_resumes_from_its_checkpoint(
    tmp_path, redis_url, shared_models_dir
):
    total = 60
    with (
        two_machines(tmp_path, redis_url, shared_models_dir) as (first, second),
        httpx.Client(base_url=first.url, timeout=60) as client,
    ):
        job_id = submit(client, "survivor", max_steps=total, save_every=10, num_nodes=2, processes_per_node=2)
        deadline = time.monotonic() + 240
        while not (
            any(e["type"] == "checkpoint" and e["data"]["step"] >= 10 for e in events(client, job_id))
            and client.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 15
        ):
            assert time.monotonic() < deadline, first.logs()
            time.sleep(0.1)
        killed_at_step = client.get(f"/jobs/{job_id}").json()["progress"]["step"]
        # Kill the worker that joined as node 1 (node 0 is the job's own worker, which hosts the rendezvous).
        member = redis.Redis.from_url(redis_url).get(f"bone:job:{job_id}:node:1").decode()
        first_log = (first.log_dir / "worker.log").read_text()
        victim, machine = (first, "worker") if f"worker {member} listening" in first_log else (second, "worker-2")
        kill_worker(victim.procs[machine])
        replacement = new_service(
            tmp_path,
            redis_url,
            shared_models_dir,
            "machine-3",
            BONE_REGISTRY_URL=str(first.data_dir / "adapters"),
            **NODE_ENV,
        )
        replacement.start("worker-3", "worker")
        try:
            done = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=400)
        finally:
            replacement.stop()
        history = events(client, job_id)
        assert done["status"] == "succeeded", (done, first.logs())
        assert done["attempts"] == 1  # the gang healed itself; the job never went back to the queue
        assert any(e["type"] == "message" and "node 1 of 2 was lost" in e["message"] for e in history)
        resumed = next(e for e in history if e["type"] == "resumed")
        assert 10 <= resumed["data"]["step"] <= killed_at_step < total
        steps = [e["data"]["step"] for e in history if e["type"] == "step"]
        assert steps[-1] == total and len(steps) < 2 * total  # not from scratch
        print(f"killed node 1 at step {killed_at_step}; resumed from step {resumed['data']['step']}")


def test_a_gang_that_does_not_assemble_goes_back_to_the_queue_then_fails_naming_the_timeout(
    tmp_path, redis_url, shared_models_dir
):
    # One worker for a two-node job: the second node never comes.
    lonely = new_service(
        tmp_path,
        redis_url,
        shared_models_dir,
        "machine-1",
        **{**NODE_ENV, "BONE_RENDEZVOUS_TIMEOUT_S": "5", "BONE_MAX_ATTEMPTS": "2"},
    )
    with running(lonely), httpx.Client(base_url=lonely.url, timeout=60) as client:
        job_id = submit(client, "alone", max_steps=2, num_nodes=2, processes_per_node=1)
        done = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
        history = events(client, job_id)
    assert done["status"] == "failed" and done["attempts"] == 2, (done, lonely.logs())
    assert "BONE_RENDEZVOUS_TIMEOUT_S" in done["error"] and "BONE_MAX_ATTEMPTS" in done["error"], done["error"]
    assert [e["data"]["attempt"] for e in history if e["type"] == "retry"] == [1]
    assert not redis.Redis.from_url(redis_url).exists(f"bone:job:{job_id}:gang")
