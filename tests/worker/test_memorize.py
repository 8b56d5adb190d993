"""A realistic check that training works: the published adapter makes the model say what it was taught.

Trains through the real task (SimpleWorker on the real Redis), then loads the adapter *from the registry*
onto a fresh copy of the base model, as the API's inference engine would, and decodes greedily.
"""

import copy
import time

import torch
from rq import Queue, SimpleWorker

from bone import BoneModel
from core.jobs import JobStatus
from core.registry import AdapterRegistry
from tests.worker.recipes import MEMORIZE_RECIPE, MEMORIZE_RECORDS


def greedy(model, tokenizer, prompt: str) -> str:
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_a_trained_adapter_reproduces_its_training_completions(task_settings, redis_conn, store, make_job, base):
    job = make_job(
        MEMORIZE_RECORDS, adapter_name="memorized", bone=MEMORIZE_RECIPE["bone"], **MEMORIZE_RECIPE["training"]
    )
    queue = Queue(task_settings.queue_name, connection=redis_conn)
    queue.enqueue("worker.tasks.run_training_job", job.id, job_id=job.id, job_timeout=task_settings.job_timeout_s)
    started = time.perf_counter()
    SimpleWorker([queue], connection=redis_conn).work(burst=True)
    elapsed = time.perf_counter() - started

    done = store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    print(
        f"memorize: {done.metrics['steps']:.0f} steps, loss {done.metrics['train_loss_first']:.3f} -> "
        f"{done.metrics['train_loss']:.3f}, training {done.metrics['train_runtime_s']:.1f} s, job {elapsed:.1f} s"
    )

    registry = AdapterRegistry(task_settings.registry_dir)
    registry.verified_weights("memorized")
    tuned = BoneModel.from_pretrained(copy.deepcopy(base.model), registry.path("memorized"))
    prompts = [r["prompt"] for r in MEMORIZE_RECORDS]
    expected = [r["completion"] for r in MEMORIZE_RECORDS]
    assert [greedy(tuned, base.tokenizer, p) for p in prompts] == expected
    base_outputs = [greedy(base.model, base.tokenizer, p) for p in prompts]
    assert not any(out == want for out, want in zip(base_outputs, expected))
