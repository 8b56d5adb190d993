"""One job on two processes (``training.num_processes = 2``, gloo on the CPU) against the same job on one.

The ranks are real processes started by torch elastic (c10d rendezvous) and synced by DDP. Each runs a disjoint
shard of the same global batch, so the step losses must match the single-process run up to float summation
order: measured differences are ~1e-7; the tolerance is 1e-5 relative (the final adapter weights 1e-4
absolute). Rank 0 reports, evaluates, checkpoints and saves the adapter; this process (the elastic agent)
publishes it."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from core.errors import InvalidRequest
from core.fleet import choose_queue, known_queues, live_workers, queue_summary
from core.registry import WEIGHTS_FILE, AdapterRegistry
from core.settings import Settings
from worker.distributed import Ranks
from worker.tasks import run_training_job

pytestmark = pytest.mark.slow

# Different lengths, so the two shards of a batch pad differently: the loss divisor must count the global step.
ROWS = [{"prompt": f"Q{i}: {'x' * (i % 5)}?\n", "completion": f"A{i}{'y' * (i % 3)}."} for i in range(10)]
RECIPE = dict(
    max_steps=8,
    learning_rate=1e-2,
    batch_size=4,
    gradient_accumulation_steps=2,
    max_seq_length=48,
    seed=7,
    eval_fraction=0.2,
    eval_every=4,
    save_every=4,
    warmup_steps=1,
)


def _losses(store, job_id):
    return [e["data"]["loss"] for e in store.events(job_id, limit=1000) if e["type"] == "step"]


def _weights(settings, name):
    return load_file(str(AdapterRegistry(settings.registry_dir).path(name) / WEIGHTS_FILE))


def test_two_processes_match_one_and_publish_one_adapter(task_settings, store, make_job):
    single = make_job(ROWS, adapter_name="single", **RECIPE)
    double = make_job(ROWS, adapter_name="double", num_processes=2, **RECIPE)
    assert run_training_job(single.id) == "succeeded", store.get(single.id).error
    assert run_training_job(double.id) == "succeeded", store.get(double.id).error

    one, two = store.get(single.id), store.get(double.id)
    assert two.metrics["num_processes"] == 2 and "num_processes" not in one.metrics
    assert one.metrics["train_examples"] == two.metrics["train_examples"] == 8  # same data, same global batch
    assert one.metrics["train_tokens"] == two.metrics["train_tokens"]
    assert one.metrics["epochs"] == two.metrics["epochs"]
    l1, l2 = _losses(store, single.id), _losses(store, double.id)
    assert len(l1) == len(l2) == 8
    assert l2 == pytest.approx(l1, rel=1e-5), (l1, l2)
    assert two.metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=1e-5)
    # rank 0 alone reports: one step event per step, one checkpoint, evals at 4 and 8
    assert [c["step"] for c in store.checkpoints(double.id)] == [4]
    evals = [e["data"]["step"] for e in store.events(double.id, limit=1000) if e["type"] == "eval"]
    assert evals == [4, 8]

    registry = AdapterRegistry(task_settings.registry_dir)
    assert sorted(a.name for a in registry.list()) == ["double", "single"]  # exactly one adapter per job
    w1, w2 = _weights(task_settings, "single"), _weights(task_settings, "double")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-4)


def test_per_device_batches_with_a_one_row_batch_match_one_process(task_settings, store, make_job):
    """7 examples in global micro-batches of 2 x 3: each epoch ends with a one-row batch, so rank 1 runs a
    zero-weight row there (DDP needs every rank in every backward) and must change nothing."""
    common = dict(max_steps=4, learning_rate=1e-2, max_seq_length=48, seed=3)
    single = make_job(ROWS[:7], adapter_name="pd-single", batch_size=6, **common)
    double = make_job(ROWS[:7], adapter_name="pd-double", num_processes=2, per_device_batch_size=3, **common)
    assert double.training.batch_size == 6
    assert run_training_job(single.id) == "succeeded", store.get(single.id).error
    assert run_training_job(double.id) == "succeeded", store.get(double.id).error
    l1, l2 = _losses(store, single.id), _losses(store, double.id)
    assert len(l1) == len(l2) == 4 and l2 == pytest.approx(l1, rel=1e-5), (l1, l2)
    assert store.get(double.id).metrics["train_tokens"] == store.get(single.id).metrics["train_tokens"]


def test_packed_blocks_on_two_processes_match_one_process(task_settings, store, make_job):
    common = dict(max_steps=3, learning_rate=1e-2, max_seq_length=32, seed=5, packing=True, batch_size=2)
    single = make_job(ROWS, adapter_name="pack-single", **common)
    double = make_job(ROWS, adapter_name="pack-double", num_processes=2, **common)
    assert run_training_job(single.id) == "succeeded", store.get(single.id).error
    assert run_training_job(double.id) == "succeeded", store.get(double.id).error
    l1, l2 = _losses(store, single.id), _losses(store, double.id)
    assert len(l1) == len(l2) == 3 and l2 == pytest.approx(l1, rel=1e-5), (l1, l2)


def test_a_cancelled_distributed_job_stops_every_process(task_settings, store, make_job):
    job = make_job(ROWS, adapter_name="stopped", num_processes=2, max_steps=5000, batch_size=4)

    def cancel_after_two_steps():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_losses(store, job.id)) < 2:
            time.sleep(0.05)
        store.request_cancel(job.id)

    canceller = threading.Thread(target=cancel_after_two_steps)
    canceller.start()
    assert run_training_job(job.id) == "cancelled"
    canceller.join()
    assert 2 <= len(_losses(store, job.id)) < 5000
    assert not AdapterRegistry(task_settings.registry_dir).exists("stopped")
    assert not torch.distributed.is_initialized()
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.name.startswith("bone-rank-")]


def test_a_lost_rank_restarts_the_group_which_resumes_from_the_checkpoint(task_settings, store, make_job):
    """SIGKILL one rank after the first checkpoint: torch elastic restarts the whole group (max_restarts), the
    new ranks resume from the checkpoint and the job succeeds with every step done."""
    import multiprocessing
    import os
    import signal

    job = make_job(ROWS, adapter_name="restarted", num_processes=2, max_steps=60, batch_size=4, save_every=4)

    def kill_a_rank_after_the_first_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not store.checkpoints(job.id):
            time.sleep(0.02)
        ranks = [p for p in multiprocessing.active_children() if p.pid != os.getpid()]
        killed.extend(p.pid for p in ranks[-1:])
        for pid in killed:
            os.kill(pid, signal.SIGKILL)

    killed: list[int] = []
    killer = threading.Thread(target=kill_a_rank_after_the_first_checkpoint)
    killer.start()
    assert run_training_job(job.id) == "succeeded", store.get(job.id).error
    killer.join()
    assert killed, "no rank process to kill"
    events = store.events(job.id, limit=5000)
    resumed = [e["data"]["step"] for e in events if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0] % 4 == 0 and resumed[0] < 60, resumed
    steps = [e["data"]["step"] for e in events if e["type"] == "step"]
    assert steps[-1] == 60 and sorted(set(steps)) == list(range(1, 61))
    assert store.get(job.id).metrics["steps"] == 60


def test_too_many_processes_fail_the_job_with_a_clear_message(tmp_path, redis_url, shared_models_dir, store, make_job):
    from worker import context

    data_dir = tmp_path / "d"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    context.use_settings(Settings(data_dir=data_dir, redis_url=redis_url, max_num_processes=2))
    try:
        job = make_job(ROWS, adapter_name="toomany", num_processes=3, batch_size=3, max_steps=2)
        assert run_training_job(job.id) == "failed"
        assert "BONE_MAX_NUM_PROCESSES" in store.get(job.id).error
    finally:
        context.use_settings(None)


@pytest.mark.parametrize(
    "fields, batch_size",
    [
        ({"num_processes": 4, "per_device_batch_size": 2}, 8),
        ({"num_processes": 4, "per_device_batch_size": 2, "batch_size": 8}, 8),
        ({"num_processes": 2, "batch_size": 6}, 6),
        ({"num_processes": 3}, None),  # the default batch_size 4 does not split over 3 processes
        ({"num_processes": 2, "batch_size": 5}, None),
        ({"num_processes": 2, "per_device_batch_size": 2, "batch_size": 6}, None),
    ],
)
def test_global_batch_from_per_device_batch_size(fields, batch_size):
    from pydantic import ValidationError

    from core.jobs import TrainingSpec

    if batch_size is None:
        with pytest.raises(ValidationError):
            TrainingSpec(**fields)
    else:
        spec = TrainingSpec(**fields)
        assert spec.batch_size == batch_size
        assert TrainingSpec.model_validate(spec.model_dump()) == spec  # a stored job reads back unchanged


def test_shards_are_disjoint_and_cover_the_batch():
    batch = list(range(7))
    shards = [Ranks(r, 3, torch.device("cpu")).shard(batch) for r in range(3)]
    assert sorted(x for s in shards for x in s) == batch and shards == [[0, 1, 2], [3, 4], [5, 6]]
    assert [Ranks(r, 2, torch.device("cpu")).shard([9]) for r in range(2)] == [[9], []]


# --- queues and adverts (core/fleet.py) ---------------------------------------------------------------------------
def test_queue_choice(tmp_path):
    s = Settings(data_dir=tmp_path, queues="cpu,gpu-24g", resource_queues={"big/model": "gpu-80g"})
    assert known_queues(s) == ["bone-training", "cpu", "gpu-24g", "gpu-80g"]
    assert choose_queue(s, None, "embedded") == "bone-training"
    assert choose_queue(s, None, "big/model") == "gpu-80g"
    assert choose_queue(s, "cpu", "big/model") == "cpu"  # the job's own choice wins
    with pytest.raises(InvalidRequest) as err:
        choose_queue(s, "gpu-7g", "embedded")
    assert err.value.param == "queue"


def test_adverts_expire_and_queues_count_workers(tmp_path, redis_conn):
    from core.fleet import advertise, withdraw

    s = Settings(data_dir=tmp_path, queues="cpu")
    advertise(redis_conn, "w1", {"device": "cpu", "memory_bytes": 1, "queues": ["cpu"]}, ttl_s=30)
    advertise(redis_conn, "w2", {"device": "cuda", "gpus": 2, "queues": ["gpu-24g", "cpu"]}, ttl_s=1)
    redis_conn.rpush("rq:queue:cpu", "a", "b")
    assert [w["name"] for w in live_workers(redis_conn)] == ["w1", "w2"]
    by_name = {q["name"]: q for q in queue_summary(redis_conn, s)}
    assert (by_name["cpu"]["depth"], by_name["cpu"]["workers"]) == (2, 2)
    assert by_name["gpu-24g"]["workers"] == 1 and not by_name["gpu-24g"]["known"]
    time.sleep(1.2)
    assert [w["name"] for w in live_workers(redis_conn)] == ["w1"]  # w2 stopped refreshing: gone
    withdraw(redis_conn, "w1")
    assert live_workers(redis_conn) == []
