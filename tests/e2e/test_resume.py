"""A worker SIGKILLed mid-training: the job is retried within 60 s, resumes from its last checkpoint on
another worker (another "machine": a data dir of its own, only the registry shared), and ends with the
weights an uninterrupted run with the same seed produces."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import new_service
from tests.e2e.test_service import wait_for

pytestmark = pytest.mark.slow

RECORDS = [{"prompt": f"Word {i}?\n", "completion": f"w{i} " * 3} for i in range(12)]
TRAINING = {
    "max_steps": 240,
    "save_every": 20,
    "batch_size": 4,
    "learning_rate": 5e-3,
    "seed": 11,
    "max_seq_length": 64,
}


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (RQ's work-horse runs in a process group of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_worker(proc) -> None:
    """SIGKILL the worker's process group and every process group below it: nothing gets to clean up."""
    groups = {os.getpgid(pid) for pid in [proc.pid, *descendants(proc.pid)]}
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    proc.wait(10)


def events(client: httpx.Client, job_id: str) -> list[dict]:
    out, after = [], None
    while True:
        reply = client.get(f"/jobs/{job_id}/events", params={"limit": 1000, **({"after": after} if after else {})})
        assert reply.status_code == 200, reply.text
        page = reply.json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = out[-1]["id"]


def weights(service, name: str) -> dict:
    return load_file(service.data_dir / "adapters" / name / "adapter_model.safetensors")


def test_a_killed_worker_job_resumes_on_another_machine_and_ends_with_the_same_weights(
    service, tmp_path, redis_url, shared_models_dir
):
    registry = service.data_dir / "adapters"  # the first worker's registry (its default), shared with the second
    other = new_service(tmp_path, redis_url, shared_models_dir, "other-machine", BONE_REGISTRY_URL=str(registry))
    with httpx.Client(base_url=service.url, timeout=60) as client:

        def submit(name: str) -> str:
            reply = client.post(
                "/jobs", json={"adapter_name": name, "dataset": {"records": RECORDS}, "training": TRAINING}
            )
            assert reply.status_code == 202, reply.text
            return reply.json()["id"]

        straight = wait_for(client, submit("straight"), {"succeeded", "failed", "cancelled"})
        assert straight["status"] == "succeeded", service.logs()

        job_id = submit("resumed")
        deadline = time.monotonic() + 120
        # Past a checkpoint and some steps beyond it, so the steps after it are lost and must be redone.
        while not (
            any(e["type"] == "checkpoint" and e["data"]["step"] >= 40 for e in events(client, job_id))
            and client.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 50
        ):
            assert time.monotonic() < deadline, service.logs()
            time.sleep(0.05)
        first_worker = client.get(f"/jobs/{job_id}").json()["worker"]
        kill_worker(service.procs["worker"])
        killed_at = time.monotonic()
        # read after the kill: a step (and its checkpoint) may land between a read before it and the kill
        killed_at_step = client.get(f"/jobs/{job_id}").json()["progress"]["step"]
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running"  # nobody has noticed yet

        assert (registry / ".resume" / job_id / "manifest.json").is_file()  # the checkpoints, where both see them

        other.start("worker2", "worker")
        try:
            while not any(e["type"] == "retry" for e in events(client, job_id)):
                assert time.monotonic() - killed_at < 60, ("no retry within 60 s", service.logs())
                time.sleep(0.2)
            retried_after = time.monotonic() - killed_at
            done = wait_for(client, job_id, {"succeeded", "failed", "cancelled"})
        finally:
            other.stop()
        assert done["status"] == "succeeded" and done["attempts"] == 2, (done, service.logs())
        assert done["worker"] != first_worker
        history = events(client, job_id)
        resumed = next(e for e in history if e["type"] == "resumed")
        assert 40 <= resumed["data"]["step"] <= killed_at_step < TRAINING["max_steps"]
        steps = [e["data"]["step"] for e in history if e["type"] == "step"]
        assert steps[-1] == TRAINING["max_steps"] and len(steps) < 2 * TRAINING["max_steps"]  # not from scratch

        a, b = weights(service, "straight"), weights(service, "resumed")
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a), worst  # bit-identical on CPU
        assert done["metrics"]["train_loss"] == straight["metrics"]["train_loss"]
        assert not (registry / ".resume" / job_id).exists()  # checkpoints gone with the job
        assert not (other.data_dir / "jobs" / job_id).exists()
        print(
            f"killed at step {killed_at_step}, retried after {retried_after:.1f} s, resumed from step "
            f"{resumed['data']['step']}, max weight difference {worst:g}"
        )
