"""``training.sharding = "full"``: one job on two processes with the base and the Bone blocks sharded by FSDP2
(``fully_shard``, gloo on the CPU), against the same job on one process.

FSDP2 runs on gloo/CPU in the torch this project pins, so this is the real code path, not a stand-in: each rank
holds half of every parameter, the gradients of the blocks are reduce-scattered, AdamW steps on the shards,
every rank evaluates, and the checkpoints and the published adapter hold the whole blocks gathered from the
shards. The losses match one process up to float summation order (tolerance 1e-5 relative, as for DDP); the
adapter within 1e-5 absolute (measured ~4e-6: AdamW's first steps magnify float noise where |g| ~ eps)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from core.registry import WEIGHTS_FILE, AdapterRegistry
from worker.tasks import run_training_job

pytestmark = pytest.mark.slow

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
    return [e["data"]["loss"] for e in store.events(job_id, limit=5000) if e["type"] == "step"]


def _weights(settings, name):
    return load_file(str(AdapterRegistry(settings.registry_dir).path(name) / WEIGHTS_FILE))


def _assert_close_adapters(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol)


def test_a_sharded_job_matches_one_process_and_publishes_the_whole_blocks(task_settings, store, make_job):
    single = make_job(ROWS, adapter_name="single", **RECIPE)
    # with activation checkpointing too (recomputing a layer in backward gathers it again): same numbers
    sharded = make_job(
        ROWS, adapter_name="sharded", num_processes=2, sharding="full", gradient_checkpointing=True, **RECIPE
    )
    assert run_training_job(single.id) == "succeeded", store.get(single.id).error
    assert run_training_job(sharded.id) == "succeeded", store.get(sharded.id).error

    one, two = store.get(single.id), store.get(sharded.id)
    l1, l2 = _losses(store, single.id), _losses(store, sharded.id)
    assert len(l1) == len(l2) == 8
    assert l2 == pytest.approx(l1, rel=1e-5), (l1, l2)
    assert two.metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=1e-5)  # every rank evaluated
    assert one.metrics["train_tokens"] == two.metrics["train_tokens"]
    assert [c["step"] for c in store.checkpoints(sharded.id)] == [4]  # gathered by both, written by rank 0
    evals = [e["data"]["step"] for e in store.events(sharded.id, limit=1000) if e["type"] == "eval"]
    assert evals == [4, 8]

    w1, w2 = _weights(task_settings, "single"), _weights(task_settings, "sharded")
    assert all(w.dim() == 2 and w.shape[0] == 8 for w in w2.values())  # whole (r x out) blocks, not shards
    _assert_close_adapters(w1, w2, atol=1e-5)


def test_a_sharded_job_whose_rank_dies_resumes_from_its_checkpoint_like_an_uninterrupted_run(
    task_settings, store, make_job
):
    """SIGKILL one rank after the first checkpoint: torch elastic restarts both, which load the whole blocks and
    AdamW's whole state back into their shards; the job ends with the uninterrupted sharded run's weights."""
    recipe = dict(max_steps=24, learning_rate=1e-2, batch_size=4, max_seq_length=48, seed=11, save_every=4)
    straight = make_job(ROWS, adapter_name="straight", num_processes=2, sharding="full", **recipe)
    assert run_training_job(straight.id) == "succeeded", store.get(straight.id).error
    job = make_job(ROWS, adapter_name="restarted", num_processes=2, sharding="full", **recipe)

    def kill_a_rank_after_the_first_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not store.checkpoints(job.id):
            time.sleep(0.01)
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
    assert len(resumed) == 1 and resumed[0] % 4 == 0 and resumed[0] < 24, resumed
    by_step = {e["data"]["step"]: e["data"]["loss"] for e in events if e["type"] == "step"}
    assert sorted(by_step) == list(range(1, 25))
    assert [by_step[s] for s in range(1, 25)] == pytest.approx(_losses(store, straight.id), rel=1e-6)
    _assert_close_adapters(_weights(task_settings, "straight"), _weights(task_settings, "restarted"), atol=1e-6)
