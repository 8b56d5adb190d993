"""A job's uploaded file in the registry's store (``BONE_REGISTRY_URL``): a store that cannot be reached while the
worker reads it sends the job back to the queue (real RQ worker, real Redis, real folder store); the retry, with
the store back, succeeds."""

from __future__ import annotations

import io
import time

from rq import Queue, SimpleWorker

from core import janitor
from core.files import FileStore
from core.jobs import JobStatus
from worker import context
from worker.tasks import run_training_job

ROWS = b"".join(b'{"prompt": "%s?", "completion": "%s"}\n' % (w, w.upper()) for w in (b"ab", b"cd", b"ef", b"gh"))


def test_an_unreachable_file_store_sends_the_job_back_to_the_queue(settings, tmp_path, redis_conn, store, make_job):
    registry = tmp_path / "registry"
    shared = settings.model_copy(update={"registry_url": f"file://{registry}"})
    context.use_settings(shared)
    try:
        info = FileStore.from_settings(shared).save(io.BytesIO(ROWS), "t.jsonl", max_bytes=10_000)
        assert (registry / ".files" / f"{info.id}.meta.json").is_file()
        (shared.files_dir / ".cache" / f"{info.id}.jsonl").unlink()  # as on a worker of another machine
        job = make_job(dataset={"file_id": info.id}, max_steps=2, batch_size=2)

        # The store breaks: its folder is not a folder any more (as a stale NFS mount answers).
        (registry / ".files").rename(registry / ".files-away")
        (registry / ".files").write_text("")
        queue = Queue(shared.queue_name, connection=redis_conn)
        queue.enqueue(run_training_job, job.id, job_id=job.id, job_timeout=shared.job_timeout_s)
        SimpleWorker([queue], connection=redis_conn).work(burst=True)
        waiting = store.get(job.id)
        assert waiting.status is JobStatus.RUNNING, waiting.error  # not failed
        assert "store of uploaded files is unreachable" in (waiting.error or "")

        assert janitor.sweep(redis_conn, shared, now=time.time() + shared.heartbeat_ttl_s) == [job.id]
        assert store.get(job.id).status is JobStatus.QUEUED
        (registry / ".files").unlink()
        (registry / ".files-away").rename(registry / ".files")
        SimpleWorker([queue], connection=redis_conn).work(burst=True)
        done = store.get(job.id)
        assert done.status is JobStatus.SUCCEEDED and done.attempts == 2, done.error
    finally:
        context.use_settings(None)
