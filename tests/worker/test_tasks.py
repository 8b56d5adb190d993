"""The RQ task end to end: jobs enqueued by dotted path on the real Redis, run by RQ's SimpleWorker."""

import shutil
import threading
import time

import pytest
import torch
from rq import Queue, SimpleWorker

from bone.layer import BoneLinear
from core.jobs import JobStatus
from core.registry import WEIGHTS_FILE, AdapterRegistry, file_sha256
from worker import model_cache
from worker.tasks import describe_failure

TASK = "worker.tasks.run_training_job"  # what the API enqueues
LEARNABLE = [{"prompt": f"{w}?", "completion": w.upper()} for w in ("ab", "cd", "ef", "gh")]


def run_queued(redis_conn, settings, *job_ids):
    queue = Queue(settings.queue_name, connection=redis_conn)
    for job_id in job_ids:
        queue.enqueue(TASK, job_id, job_id=job_id, job_timeout=settings.job_timeout_s)
    SimpleWorker([queue], connection=redis_conn).work(burst=True)


def step_events(store, job_id):
    return [e for e in store.events(job_id, limit=1000) if e["type"] == "step"]


def test_a_job_trains_and_publishes_its_adapter(task_settings, redis_conn, store, make_job):
    job = make_job(LEARNABLE, adapter_name="letters", max_steps=12, learning_rate=1e-2, batch_size=4)
    run_queued(redis_conn, task_settings, job.id)

    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.error is None and done.attempts == 1 and done.started_at <= done.finished_at
    assert (done.progress.step, done.progress.total_steps) == (12, 12)
    assert (done.progress.phase, done.progress.eta_s) == (None, None)  # finished: no phase "publishing" left behind
    assert done.metrics["train_loss"] < done.metrics["train_loss_first"]  # it learned

    registry = AdapterRegistry(task_settings.registry_dir)
    info = registry.get("letters")
    assert info.sha256 == file_sha256(registry.path("letters") / WEIGHTS_FILE)
    assert (info.job_id, info.base_model, info.bone["r"]) == (job.id, "embedded", 8)
    assert info.metrics["train_loss"] == done.metrics["train_loss"]
    config = registry.adapter_config("letters")
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == (
        "BONE",
        "CAUSAL_LM",
        "embedded",
    )

    steps = step_events(store, job.id)
    assert [e["data"]["step"] for e in steps] == list(range(1, 13))
    assert set(steps[-1]["data"]) >= {"loss", "lr", "grad_norm", "tokens_per_s", "total_steps"}
    assert not (task_settings.jobs_dir / job.id).exists()  # temp files gone


def test_a_second_job_reuses_the_cached_base_model_untouched(task_settings, redis_conn, store, make_job):
    first = make_job(LEARNABLE, adapter_name="one", max_steps=2)
    run_queued(redis_conn, task_settings, first.id)
    loads = model_cache.loads
    cached = model_cache.preload("embedded", task_settings, torch.device("cpu"))
    before = {k: v.clone() for k, v in cached.model.state_dict().items()}

    second = make_job(LEARNABLE, adapter_name="two", max_steps=2, bone={"bias": "all"})  # trains base biases
    run_queued(redis_conn, task_settings, second.id)
    assert store.get(second.id).status is JobStatus.SUCCEEDED
    assert model_cache.loads == loads  # not read from disk again
    assert not any(isinstance(m, BoneLinear) for m in cached.model.modules())  # the job wrapped its own copy
    after = cached.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_bad_row_fails_the_job_naming_the_row(task_settings, redis_conn, store, make_job):
    job = make_job([{"text": "fine"}, {"prompt": "no completion"}], adapter_name="bad")
    run_queued(redis_conn, task_settings, job.id)
    done = store.get(job.id)
    assert done.status is JobStatus.FAILED
    assert done.error.startswith("dataset row 1: missing field 'completion'")
    assert not AdapterRegistry(task_settings.registry_dir).exists("bad")
    assert store.events(job.id)[-1]["data"]["status"] == "failed"


def test_an_existing_adapter_is_not_overwritten_unless_asked(task_settings, redis_conn, store, make_job):
    first = make_job(LEARNABLE, adapter_name="taken", max_steps=1)
    second = make_job(LEARNABLE, adapter_name="taken", max_steps=1)
    third = make_job(LEARNABLE, adapter_name="taken", max_steps=1, overwrite=True)
    run_queued(redis_conn, task_settings, first.id, second.id, third.id)
    assert [store.get(j.id).status for j in (first, second, third)] == [
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.SUCCEEDED,
    ]
    assert "already exists" in store.get(second.id).error
    assert AdapterRegistry(task_settings.registry_dir).get("taken").job_id == third.id


def test_a_job_never_replaces_another_owners_adapter(task_settings, redis_conn, store, make_job):
    # The API refuses such a job up front; this is the name being taken by bob while alice's job trained.
    bobs = make_job(LEARNABLE, adapter_name="contested", max_steps=1)
    alices = make_job(LEARNABLE, adapter_name="contested", max_steps=1, overwrite=True)
    bobs_again = make_job(LEARNABLE, adapter_name="contested", max_steps=1, overwrite=True)
    for job, owner in ((bobs, "bob"), (alices, "alice"), (bobs_again, "bob")):
        store.update(job.id, owner=owner)
    run_queued(redis_conn, task_settings, bobs.id, alices.id, bobs_again.id)
    assert [store.get(j.id).status for j in (bobs, alices, bobs_again)] == [
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.SUCCEEDED,
    ]
    assert "already in use" in store.get(alices.id).error
    info = AdapterRegistry(task_settings.registry_dir).get("contested")
    assert (info.owner, info.job_id) == ("bob", bobs_again.id)  # its owner may still overwrite it


def test_a_job_cancelled_before_it_starts_never_runs(task_settings, redis_conn, store, make_job):
    # The API sets the flag first; a worker that dequeues the job before the API marks it cancelled
    # must still not run it.
    job = make_job(LEARNABLE, adapter_name="never")
    store.request_cancel(job.id)
    run_queued(redis_conn, task_settings, job.id)
    done = store.get(job.id)
    assert done.status is JobStatus.CANCELLED and done.started_at is None and done.attempts == 0
    assert step_events(store, job.id) == []
    assert not AdapterRegistry(task_settings.registry_dir).exists("never")


def test_a_running_job_stops_at_the_next_step_when_cancelled(task_settings, redis_conn, store, make_job):
    job = make_job(LEARNABLE, adapter_name="stopped", max_steps=2000)

    def cancel_after_two_steps():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(step_events(store, job.id)) < 2:
            time.sleep(0.02)
        store.request_cancel(job.id)

    canceller = threading.Thread(target=cancel_after_two_steps)
    canceller.start()
    run_queued(redis_conn, task_settings, job.id)
    canceller.join()

    done = store.get(job.id)
    assert done.status is JobStatus.CANCELLED and done.error is None
    assert 2 <= len(step_events(store, job.id)) < 2000
    assert not AdapterRegistry(task_settings.registry_dir).exists("stopped")
    assert not (task_settings.jobs_dir / job.id).exists()


@pytest.mark.parametrize(
    "exc, expected",
    [
        (ValueError("boom\nsecond line"), "ValueError: boom second line"),
        (RuntimeError("x" * 2000), "RuntimeError: " + "x" * 485 + "…"),
    ],
)
def test_failures_are_one_line(exc, expected):
    assert describe_failure(exc) == expected


# --- evaluation, checkpoints, events, cancel phases, resume ----------------------------------------------
def test_eval_metrics_and_truncation_reach_the_adapter_and_the_events(task_settings, redis_conn, store, make_job):
    rows = LEARNABLE * 3 + [{"text": "a long row " * 20}]
    job = make_job(
        rows,
        adapter_name="evaluated",
        max_steps=6,
        batch_size=4,
        learning_rate=1e-2,
        eval_fraction=0.25,
        eval_every=3,
        max_seq_length=24,
    )
    run_queued(redis_conn, task_settings, job.id)
    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    metrics = AdapterRegistry(task_settings.registry_dir).get("evaluated").metrics
    assert metrics["eval_loss"] == done.metrics["eval_loss"] and 0 <= metrics["eval_token_accuracy"] <= 1
    assert metrics["eval_examples"] == 3 and metrics["train_examples"] == 10 and metrics["truncated_examples"] == 1

    events = store.events(job.id, limit=1000)
    kinds = [e["type"] for e in events]
    # 10 training examples in batches of 4: an epoch every 3 steps; evals at 3 and at the end (6).
    assert kinds == ["status", "message"] + ["step"] * 3 + ["epoch", "eval"] + ["step"] * 3 + [
        "epoch",
        "eval",
        "status",
    ]
    assert events[0]["message"] == "started (attempt 1)" and events[-1]["message"].startswith("finished: published")
    assert events[1]["data"]["truncated"] == 1 and "1 truncated to max_seq_length=24" in events[1]["message"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert done.progress.eta_s is None and done.progress.phase is None  # final: no phase, nothing left to wait for


def test_published_checkpoints_are_listed_and_usable(task_settings, redis_conn, store, make_job):
    job = make_job(LEARNABLE, adapter_name="ckpt", max_steps=5, save_every=2, publish_checkpoints=True)
    run_queued(redis_conn, task_settings, job.id)
    assert store.get(job.id).status is JobStatus.SUCCEEDED
    listed = store.checkpoints(job.id)
    assert [(c["step"], c["adapter"]) for c in listed] == [(2, "ckpt-step-2"), (4, "ckpt-step-4")]
    registry = AdapterRegistry(task_settings.registry_dir)
    assert sorted(a.name for a in registry.list()) == ["ckpt", "ckpt-step-2", "ckpt-step-4"]
    assert registry.get("ckpt-step-4").job_id == job.id
    registry.verified_weights("ckpt-step-2")
    assert not (task_settings.jobs_dir / job.id).exists()


def request_cancel_on_entry(monkeypatch, store, module, name):
    """Wrap ``module.name`` so a cancel arrives the moment that phase begins."""
    original = getattr(module, name)
    holder = {}

    def wrapped(*args, **kwargs):
        store.request_cancel(holder["job_id"])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return holder


@pytest.mark.parametrize("phase", ["tokenizing", "training", "evaluating", "checkpointing"])
def test_cancel_lands_in_every_phase(task_settings, redis_conn, store, make_job, monkeypatch, phase):
    import worker.eval_metrics
    import worker.job_steps
    import worker.resume
    import worker.tasks
    import worker.train

    target = {
        "tokenizing": (worker.job_steps, "tokenize_rows"),
        "training": (worker.tasks, "train"),
        "evaluating": (worker.train, "evaluate"),
        "checkpointing": (worker.resume, "save"),
    }[phase]
    holder = request_cancel_on_entry(monkeypatch, store, *target)
    job = make_job(
        LEARNABLE * 50,
        adapter_name="phases",
        max_steps=500,
        eval_every=3,
        eval_fraction=0.1,
        save_every=2,
        publish_checkpoints=True,
    )
    holder["job_id"] = job.id
    run_queued(redis_conn, task_settings, job.id)

    done = store.get(job.id)
    assert done.status is JobStatus.CANCELLED, done.error
    steps = len(step_events(store, job.id))
    assert steps <= {"tokenizing": 0, "training": 1, "evaluating": 3, "checkpointing": 3}[phase]
    assert AdapterRegistry(task_settings.registry_dir).list() == []  # checkpoint adapters too
    assert not (task_settings.jobs_dir / job.id).exists()
    assert store.events(job.id)[-1]["data"]["status"] == "cancelled"


class WorkerKilled(BaseException):
    """Escapes the task like a SIGKILL would: no failure is recorded, the work dir stays."""


def test_a_retried_job_resumes_from_its_checkpoint_and_ends_with_the_same_weights(
    task_settings, redis_conn, store, make_job, monkeypatch
):
    from safetensors.torch import load_file

    from core import janitor
    from worker import tasks
    from worker.progress import ProgressReporter

    recipe = dict(max_steps=8, save_every=3, batch_size=3, learning_rate=1e-2, seed=5)
    straight = make_job(LEARNABLE, adapter_name="straight", **recipe)
    run_queued(redis_conn, task_settings, straight.id)

    job = make_job(LEARNABLE, adapter_name="resumed", **recipe)
    original_on_step = ProgressReporter.on_step

    def die_at_step_5(self, step, *rest):
        original_on_step(self, step, *rest)
        if step == 5:
            raise WorkerKilled()

    monkeypatch.setattr(ProgressReporter, "on_step", die_at_step_5)
    with pytest.raises(WorkerKilled):
        tasks.run_training_job(job.id)
    monkeypatch.undo()
    assert store.get(job.id).status is JobStatus.RUNNING
    assert (task_settings.jobs_dir / job.id / "checkpoints" / "step-00000003").is_dir()

    assert janitor.sweep(redis_conn, task_settings, now=time.time() + task_settings.heartbeat_ttl_s) == [job.id]
    assert store.get(job.id).status is JobStatus.QUEUED
    SimpleWorker([Queue(task_settings.queue_name, connection=redis_conn)], connection=redis_conn).work(burst=True)

    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 2, done.error
    kinds = [e["type"] for e in store.events(job.id, limit=1000)]
    assert "retry" in kinds and "resumed" in kinds
    assert [e["data"]["step"] for e in step_events(store, job.id)] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    registry = AdapterRegistry(task_settings.registry_dir)
    a = load_file(registry.path("straight") / WEIGHTS_FILE)
    b = load_file(registry.path("resumed") / WEIGHTS_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert done.metrics["train_loss"] == store.get(straight.id).metrics["train_loss"]


def test_weights_with_nan_or_inf_are_never_published(tmp_path):
    """A diverged run (NaN/inf in a block) fails its job naming the tensor instead of publishing poison."""
    from bone.adapter_files import write_adapter_dir
    from core.errors import ServiceError
    from worker.publish import check_publishable

    config = {"peft_type": "BONE", "r": 2, "target_modules": ["q_proj"], "init_weights": True}
    write_adapter_dir(tmp_path / "ok", config, {"base_model.model.q_proj.bone_block": torch.ones(2, 4)})
    check_publishable(tmp_path / "ok")
    write_adapter_dir(
        tmp_path / "bad", config, {"base_model.model.q_proj.bone_block": torch.tensor([[1.0, float("nan")]])}
    )
    with pytest.raises(ServiceError) as refused:
        check_publishable(tmp_path / "bad")
    assert refused.value.code == "non_finite_weights" and "q_proj.bone_block" in refused.value.message


@pytest.mark.parametrize("registry_kind", ["shared folder", "s3"])
def test_a_retried_job_resumes_on_another_machine_from_the_registry_store(
    task_settings, redis_conn, store, make_job, monkeypatch, tmp_path, shared_models_dir, request, registry_kind
):
    """Attempt 1 runs on "machine A", dies after its checkpoint of step 3, and its data dir is lost with it;
    attempt 2 runs on "machine B" (its own data dir, the same registry: a folder or S3) and resumes from step 3
    with the weights of an uninterrupted run, bit for bit."""
    from core import janitor
    from core.settings import Settings
    from core.storage.resume_state import ResumeStore
    from worker import context, tasks
    from worker.progress import ProgressReporter

    shared: dict = {"registry_url": str(task_settings.registry_dir)}
    if registry_kind == "s3":
        s3_server = request.getfixturevalue("s3_server")
        shared = {"registry_url": request.getfixturevalue("s3_url"), "s3_endpoint_url": s3_server.endpoint_url}
    machine_a = task_settings.model_copy(update=shared)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "models").symlink_to(shared_models_dir, target_is_directory=True)
    machine_b = Settings(data_dir=tmp_path / "b", redis_url=task_settings.redis_url, **shared)
    context.use_settings(machine_a)

    recipe = dict(max_steps=8, save_every=3, batch_size=3, learning_rate=1e-2, seed=5)
    straight = make_job(LEARNABLE, adapter_name="straight", **recipe)
    run_queued(redis_conn, machine_a, straight.id)
    job = make_job(LEARNABLE, adapter_name="resumed", **recipe)
    original_on_step = ProgressReporter.on_step

    def die_at_step_5(self, step, *rest):
        original_on_step(self, step, *rest)
        if step == 5:
            raise WorkerKilled()

    monkeypatch.setattr(ProgressReporter, "on_step", die_at_step_5)
    with pytest.raises(WorkerKilled):
        tasks.run_training_job(job.id)
    monkeypatch.undo()
    shutil.rmtree(machine_a.jobs_dir / job.id)  # machine A is gone, and its disk with it
    assert ResumeStore.from_settings(machine_b).manifest(job.id)["checkpoints"][-1]["step"] == 3

    assert janitor.sweep(redis_conn, machine_a, now=time.time() + machine_a.heartbeat_ttl_s) == [job.id]
    context.use_settings(machine_b)
    SimpleWorker([Queue(machine_b.queue_name, connection=redis_conn)], connection=redis_conn).work(burst=True)

    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.attempts == 2, done.error
    resumed = [e for e in store.events(job.id, limit=1000) if e["type"] == "resumed"]
    assert [e["data"]["step"] for e in resumed] == [3]
    assert [e["data"]["step"] for e in step_events(store, job.id)] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    registry = AdapterRegistry.from_settings(machine_b)
    a, b = registry.verified_tensors("straight")[0], registry.verified_tensors("resumed")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert done.metrics["train_loss"] == store.get(straight.id).metrics["train_loss"]
    # Gone with the job: the store's checkpoints and machine B's scratch copy.
    assert ResumeStore.from_settings(machine_b).manifest(job.id) is None
    assert ResumeStore.from_settings(machine_b).job_ids() == []
    assert not (machine_b.jobs_dir / job.id).exists()
