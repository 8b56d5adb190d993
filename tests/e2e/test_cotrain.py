"""Co-training end to end: four jobs queued, one real `bone-server worker` trains them in one group; a cancel
of one leaves the others to succeed; a SIGKILLed worker's group is re-queued member by member by the janitor
and each member resumes from its own checkpoint on a new worker."""

from __future__ import annotations

import time
from contextlib import contextmanager

import httpx
import pytest

from tests.e2e.conftest import new_service
from tests.e2e.test_resume import events, kill_worker
from tests.e2e.test_service import wait_for

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "cancelled"}


def records(k: int) -> list[dict[str, str]]:
    return [{"prompt": f"Job {k} word {i}?\n", "completion": f"w{k}{i} " * (1 + i % 3)} for i in range(10)]


def training(k: int, **more) -> dict:
    # different lengths, batch sizes and learning rates: the group is no group of equals
    return {
        "max_steps": 30 + 10 * k,
        "batch_size": 1 + k % 3,
        "learning_rate": 1e-3 * (k + 1),
        "seed": k,
        "max_seq_length": 64,
        **more,
    }


@contextmanager
def api_only(svc):
    """The API of ``svc`` without a worker, so jobs stay queued until a test starts one."""
    svc.start("api", "api")
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


def submit(client: httpx.Client, name: str, k: int, **more) -> str:
    reply = client.post(
        "/jobs", json={"adapter_name": name, "dataset": {"records": records(k)}, "training": training(k, **more)}
    )
    assert reply.status_code == 202, reply.text
    return reply.json()["id"]


def wait_running(client: httpx.Client, ids: list[str], step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        jobs = [client.get(f"/jobs/{i}").json() for i in ids]
        if all(j["status"] == "running" and j["progress"]["step"] >= step for j in jobs):
            return
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)


@pytest.fixture
def svc(tmp_path, redis_url, shared_models_dir):
    service = new_service(
        tmp_path, redis_url, shared_models_dir, BONE_COTRAIN_MAX_JOBS="8", BONE_COTRAIN_MAX_SLOWDOWN="0"
    )
    with api_only(service):
        yield service


def test_four_queued_jobs_train_in_one_group_and_all_succeed(svc):
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        ids = [submit(client, f"co-{k}", k) for k in range(4)]
        svc.start("worker", "worker")
        done = [wait_for(client, i, FINAL) for i in ids]
        assert [d["status"] for d in done] == ["succeeded"] * 4, svc.logs()
        for d in done:
            assert sorted(d["co_trained_with"]) == sorted(set(ids) - {d["id"]}), d
            steps = [e["data"] for e in events(client, d["id"]) if e["type"] == "step"]
            assert len(steps) == d["training"]["max_steps"]
            shared = [s for s in steps if s.get("co_trained_with")]
            assert shared, "no step was trained with another job"
            assert all(0 < s["share_s"] and s["rows"] < s["group_rows"] for s in shared)
        assert len({d["worker"] for d in done}) == 1  # one worker trained all four


def test_cancelling_one_member_leaves_the_others_to_succeed(svc):
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        ids = [submit(client, f"cx-{k}", k, max_steps=60) for k in range(4)]
        svc.start("worker", "worker")
        wait_running(client, ids, 5)
        assert client.post(f"/jobs/{ids[1]}/cancel").status_code == 200
        done = [wait_for(client, i, FINAL) for i in ids]
        assert [d["status"] for d in done] == ["succeeded", "cancelled", "succeeded", "succeeded"], svc.logs()
        assert not (svc.data_dir / "adapters" / "cx-1").exists()


def test_a_killed_group_is_requeued_and_every_member_resumes_from_its_own_checkpoint(
    svc, tmp_path, redis_url, shared_models_dir
):
    registry = svc.data_dir / "adapters"
    other = new_service(
        tmp_path,
        redis_url,
        shared_models_dir,
        "other-machine",
        BONE_REGISTRY_URL=str(registry),
        BONE_COTRAIN_MAX_JOBS="8",
        BONE_COTRAIN_MAX_SLOWDOWN="0",  # grouped whatever a tiny model's group costs on this CPU
    )
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        ids = [submit(client, f"ck-{k}", k, max_steps=200, save_every=10) for k in range(4)]
        svc.start("worker", "worker")
        deadline = time.monotonic() + 180
        while not all(
            any(e["type"] == "checkpoint" for e in events(client, i)) for i in ids
        ):  # every member has a checkpoint of its own
            assert time.monotonic() < deadline, svc.logs()
            time.sleep(0.1)
        kill_worker(svc.procs["worker"])
        other.start("worker2", "worker")
        try:
            done = [wait_for(client, i, FINAL, timeout=400) for i in ids]
        finally:
            other.stop()
        assert [d["status"] for d in done] == ["succeeded"] * 4, (done, svc.logs())
        for d in done:
            assert d["attempts"] == 2, d
            history = events(client, d["id"])
            assert any(e["type"] == "retry" for e in history)
            resumed = [e["data"]["step"] for e in history if e["type"] == "resumed"]
            assert resumed and resumed[0] >= 10, history[-5:]
            steps = [e["data"]["step"] for e in history if e["type"] == "step"]
            assert steps[-1] == 200 and len(steps) < 2 * 200  # resumed, not from scratch
