"""`bone-server worker` survives its Redis: started before Redis answers, or with Redis stopped and started
again under it, it waits and reconnects (with backoff) instead of exiting, and then runs the next job.

A private real redis-server on its own port, which the test stops and starts: the shared Redis is not touched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from rq import Queue

from core.jobs import BoneSpec, Job, JobStatus, RecordsDataset, TrainingSpec, dataset_summary
from core.jobstore import JobStore
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TASK = "worker.tasks.run_training_job"


class PrivateRedis:
    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping():
                    return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout} s; worker log:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_the_worker_waits_for_redis_and_reconnects_after_an_outage(tmp_path, shared_models_dir):
    private = PrivateRedis(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    env = {
        **os.environ,
        "BONE_DATA_DIR": str(data_dir),
        "BONE_REDIS_URL": private.url,
        "OMP_NUM_THREADS": "1",
        "BONE_RECONNECT_MAX_BACKOFF_S": "2",
        "BONE_WORKER_TTL_S": "15",
        "BONE_LOG_LEVEL": "info",
    }
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli", "worker"], env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )
    try:
        # 1. no Redis yet: the worker waits instead of exiting
        wait_for(lambda: "reconnecting in" in log.read_text(), 60, "no reconnect attempt logged", log)
        time.sleep(2)
        assert worker.poll() is None, log.read_text()[-3000:]

        # 2. Redis comes: the worker connects and advertises itself
        private.start()
        conn = redis.Redis.from_url(private.url)
        wait_for(lambda: conn.keys("bone:worker:*"), 30, "the worker did not advertise itself", log)

        # 3. Redis goes away for longer than a maintenance pass (every 5 s here), then comes back empty
        private.stop()
        time.sleep(8)
        assert worker.poll() is None, log.read_text()[-3000:]
        private.start()
        conn = redis.Redis.from_url(private.url)

        # 4. the next job runs
        store = JobStore(conn)
        records = [{"text": "hello"}, {"text": "world"}]
        job = Job(
            id=Job.new_id(),
            adapter_name="after-outage",
            base_model="embedded",
            dataset=dataset_summary(RecordsDataset(records=records)),
            bone=BoneSpec(),
            training=TrainingSpec(max_steps=2),
        )
        store.create(job, records=records)
        Queue("bone-training", connection=conn).enqueue(TASK, job.id, job_id=job.id, job_timeout=600)
        wait_for(lambda: store.get(job.id).status is JobStatus.SUCCEEDED, 120, "the job did not succeed", log)
        assert worker.poll() is None
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        private.stop()
