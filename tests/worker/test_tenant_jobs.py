"""Issue 13 on a real worker (an RQ SimpleWorker running the training task on real Redis): a job's dataset
stays in the datasets folder even when the API was bypassed (row 2), a job's size is bounded once its data is
read (row 7), and its inline records are gone once it ends (row 6)."""

from __future__ import annotations

import io

import pytest

from core.files import FileStore
from core.jobs import JobStatus
from core.registry import AdapterRegistry
from tests.worker.test_tasks import LEARNABLE, run_queued
from worker import context


@pytest.fixture
def bounded(settings):
    """Task settings with a small step bound, so an epochs-only job can exceed it on a few rows."""
    small = settings.model_copy(update={"max_train_steps": 5})
    context.use_settings(small)
    yield small
    context.use_settings(None)


@pytest.mark.parametrize("name", ["files", "data/files"])
def test_row2_a_queued_hf_dataset_outside_the_datasets_dir_fails_without_reading(
    bounded, redis_conn, store, make_job, monkeypatch, name
):
    FileStore(bounded.files_dir).save(
        io.BytesIO(b'{"text": "alice secret"}\n'), "alice.jsonl", owner="alice", max_bytes=10_000
    )
    # The worker's working directory holds the data dir, so "files" or "data/files" would be alice's uploads.
    monkeypatch.chdir(bounded.data_dir if name == "files" else bounded.data_dir.parent)
    job = make_job(dataset={"hf_dataset": name})
    run_queued(redis_conn, bounded, job.id)
    done = store.get(job.id)
    assert done.status is JobStatus.FAILED
    assert f"hf_dataset {name!r} is not available" in done.error
    assert not AdapterRegistry(bounded.registry_dir).exists(done.adapter_name)


def test_row7_epochs_beyond_the_step_bound_fail_the_job_naming_the_setting(bounded, redis_conn, store, make_job):
    job = make_job(LEARNABLE, epochs=3, batch_size=1)  # 4 rows x 3 epochs = 12 steps > 5
    run_queued(redis_conn, bounded, job.id)
    done = store.get(job.id)
    assert done.status is JobStatus.FAILED and "BONE_MAX_TRAIN_STEPS" in done.error
    assert not AdapterRegistry(bounded.registry_dir).exists(done.adapter_name)


def test_row6_inline_records_are_deleted_when_the_job_ends(bounded, redis_conn, store, make_job):
    job = make_job(LEARNABLE, max_steps=2, batch_size=2)
    assert store.records(job.id) == LEARNABLE
    run_queued(redis_conn, bounded, job.id)
    assert store.get(job.id).status is JobStatus.SUCCEEDED
    assert store.records(job.id) is None and not redis_conn.exists(f"bone:job:{job.id}:records")
