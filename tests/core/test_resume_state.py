"""Resume checkpoints in the registry's store (core/storage/resume_state.py), on a local folder and on a real
S3 server (SeaweedFS, tests/s3server.py): whole checkpoints only, the newest N kept, each read back by another
process's view of the store, hidden from the adapter listing and the registry's sweep, swept with their job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.janitor import sweep_shared_checkpoints
from core.jobs import BoneSpec, Job, JobStatus, TrainingSpec
from core.jobstore import JobStore
from core.registry import AdapterRegistry
from core.settings import Settings
from core.storage.resume_state import RESUME_DIR, ResumeStore

JOB = "job-0123456789abcdef0123"


def checkpoint_folder(tmp_path: Path, step: int) -> Path:
    folder = tmp_path / f"local-{step}"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({"step": step}))
    (folder / "trainable.safetensors").write_bytes(bytes([step % 256]) * 1000)
    (folder / "sub" / "nested.bin").write_bytes(b"nested %d" % step)
    return folder


@pytest.fixture(params=["folder", "s3"])
def registries(request, tmp_path):
    """Two views of one registry (two workers' processes): (writer, reader)."""
    if request.param == "folder":
        root = tmp_path / "shared-registry"
        return AdapterRegistry(root), AdapterRegistry(root)
    s3_server, url = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_url")

    def view(label: str) -> AdapterRegistry:
        return AdapterRegistry(
            url, cache_dir=tmp_path / f"cache-{label}", storage_options={"endpoint_url": s3_server.endpoint_url}
        )

    return view("a"), view("b")


def test_a_checkpoint_written_by_one_worker_is_read_back_by_another(registries, tmp_path):
    writer, reader = (ResumeStore(r.storage) for r in registries)
    assert reader.fetch_newest(JOB, tmp_path / "b") is None
    for step in (10, 20, 30):
        writer.put(JOB, step, checkpoint_folder(tmp_path, step), keep=2)

    step, folder = reader.fetch_newest(JOB, tmp_path / "b")
    assert (step, folder) == (30, tmp_path / "b" / "step-00000030")
    for rel in ("state.json", "trainable.safetensors", "sub/nested.bin"):
        assert (folder / rel).read_bytes() == (tmp_path / "local-30" / rel).read_bytes()
    manifest = reader.manifest(JOB)
    assert [e["step"] for e in manifest["checkpoints"]] == [20, 30]  # keep=2: the oldest went
    # ... with its files: only the folders the manifest names (and the manifest) are left
    assert len(writer.files.children(JOB)) == 3
    assert reader.job_ids() == [JOB]

    # Fetched again into the same place: nothing changes (files already there are checked, not refetched).
    assert reader.fetch_newest(JOB, tmp_path / "b") == (30, folder)


def test_a_half_written_checkpoint_is_never_resumed(registries, tmp_path, monkeypatch):
    writer, reader = (ResumeStore(r.storage) for r in registries)
    writer.put(JOB, 10, checkpoint_folder(tmp_path, 10), keep=2)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # the writer dies after uploading the files, before the manifest

    monkeypatch.setattr(type(writer.files), "write_atomic", die)
    with pytest.raises(KeyboardInterrupt):
        writer.put(JOB, 20, checkpoint_folder(tmp_path, 20), keep=2)
    monkeypatch.undo()
    assert len(writer.files.children(JOB)) == 3  # step 20's files are there ...
    assert reader.fetch_newest(JOB, tmp_path / "b")[0] == 10  # ... but no manifest names them

    # The retry redoes step 20: the dead attempt's files are replaced, the leftovers go.
    writer.put(JOB, 20, checkpoint_folder(tmp_path, 20), keep=2)
    assert reader.fetch_newest(JOB, tmp_path / "b")[0] == 20
    assert len(writer.files.children(JOB)) == 3


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(registries, tmp_path):
    writer, reader = (ResumeStore(r.storage) for r in registries)
    writer.put(JOB, 10, checkpoint_folder(tmp_path, 10), keep=2)
    writer.put(JOB, 20, checkpoint_folder(tmp_path, 20), keep=2)
    newest = reader.manifest(JOB)["checkpoints"][-1]["folder"]
    writer.files.remove(f"{JOB}/{newest}/state.json")  # lost
    assert reader.fetch_newest(JOB, tmp_path / "b")[0] == 10
    writer.files.write_atomic(f"{JOB}/{newest}/state.json", b"not what was hashed")  # changed
    assert reader.fetch_newest(JOB, tmp_path / "c")[0] == 10


def test_hidden_from_the_adapter_listing_and_left_alone_by_the_registry_sweep(registries, tmp_path):
    registry = registries[0]
    ResumeStore(registry.storage).put(JOB, 10, checkpoint_folder(tmp_path, 10), keep=2)
    assert registry.list() == []
    registry.sweep(0.0)
    assert ResumeStore(registry.storage).fetch_newest(JOB, tmp_path / "b")[0] == 10


def test_the_janitor_removes_the_checkpoints_of_final_and_unknown_jobs(tmp_path, redis_conn):
    settings = Settings(data_dir=tmp_path / "data")
    store, shared = JobStore(redis_conn), ResumeStore.from_settings(settings)
    jobs = {}
    for status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED):
        job = Job(
            id=Job.new_id(),
            adapter_name="a",
            base_model="embedded",
            dataset={"records": 1},
            bone=BoneSpec(),
            training=TrainingSpec(),
        )
        store.create(job, records=None)
        store.update(job.id, status=status)
        jobs[status] = job.id
    unknown = Job.new_id()
    for job_id in [*jobs.values(), unknown]:
        shared.put(job_id, 5, checkpoint_folder(tmp_path / job_id, 5), keep=2)

    assert sweep_shared_checkpoints(store, settings) == 1  # the failed one; the unknown one is too recent
    assert sorted(shared.job_ids()) == sorted([jobs[JobStatus.QUEUED], jobs[JobStatus.RUNNING], unknown])
    assert sweep_shared_checkpoints(store, settings, min_age_s=0.0) == 1  # an unknown job's, once old enough
    assert sorted(shared.job_ids()) == sorted([jobs[JobStatus.QUEUED], jobs[JobStatus.RUNNING]])
    assert (settings.registry_dir / RESUME_DIR).is_dir()
    assert 0 < shared.age_s(jobs[JobStatus.RUNNING]) < 60


def test_the_janitor_thread_sweeps_the_store(tmp_path, redis_url, redis_conn):
    from core.janitor import Janitor

    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, janitor_interval_s=0.1)
    store, shared = JobStore(redis_conn), ResumeStore.from_settings(settings)
    job = Job(
        id=Job.new_id(),
        adapter_name="a",
        base_model="embedded",
        dataset={"records": 1},
        bone=BoneSpec(),
        training=TrainingSpec(),
    )
    store.create(job, records=None)
    store.update(job.id, status=JobStatus.SUCCEEDED)
    shared.put(job.id, 5, checkpoint_folder(tmp_path, 5), keep=2)
    janitor = Janitor(settings).start()
    try:
        deadline = time.monotonic() + 10
        while shared.job_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        janitor.stop()
    assert shared.job_ids() == []
