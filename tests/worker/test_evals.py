"""Adapter evaluation (worker/evals.py): mixed-adapter batches score each row exactly as that adapter alone
would, and the RQ task end to end on the real Redis (SimpleWorker, burst)."""

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from rq import Queue, SimpleWorker

from bone import BoneConfig, BoneModel, get_bone_model
from core.evals import EvalStore, Evaluation
from core.jobs import JobStatus, RecordsDataset, dataset_summary
from core.names import BASE_ADAPTER
from core.queueing import EVAL_TASK
from core.registry import AdapterRegistry
from tests.worker.recipes import MEMORIZE_RECIPE, MEMORIZE_RECORDS
from worker.data import tokenize_rows
from worker.eval_metrics import evaluate
from worker.evals import completion_prompts, generate_rows, load_adapters, score_rows

ROWS = [
    {"text": "a plain line of text to score"},
    {"prompt": "Q: two plus two?\n", "completion": "four"},
    {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi!"}]},
    {"prompt": "short", "completion": " and a much longer completion than the others in the batch"},
    {"text": "x"},
]
VARIANTS = {"bone-a": (4, False), "bone-b": (8, False), "bat-c": (4, "bat")}  # name: (r, init_weights)


def publish_random(base, registry: AdapterRegistry, name: str, r: int, init_weights, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = BoneConfig(r=r, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_weights=init_weights)
        model = get_bone_model(copy.deepcopy(base.model), config)
        for _, layer in model.bone_layers():  # visibly different from the base (Bat starts as the identity)
            torch.nn.init.normal_(layer.bone_block["default"], std=0.05)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        registry.publish(name, Path(folder), {"base_model": "embedded", "bone": config.to_dict()})


@pytest.fixture
def registry(settings, base) -> AdapterRegistry:
    registry = AdapterRegistry(settings.registry_dir)
    for seed, (name, (r, init)) in enumerate(VARIANTS.items()):
        publish_random(base, registry, name, r, init, seed)
    return registry


def test_a_mixed_batch_scores_each_adapter_as_it_scores_alone(base, registry):
    names = list(VARIANTS)
    bone_model = BoneModel(copy.deepcopy(base.model)).eval()
    slots, shas = load_adapters(bone_model, registry, names, "embedded")
    assert shas == {n: registry.get(n).sha256 for n in names}
    examples = tokenize_rows(ROWS, base.tokenizer, 64).examples
    pad = base.tokenizer.pad_token_id
    # 5 examples in batches of 2: the batches are ragged (padding) and the last one is short
    row_slots = [*(slots[n] for n in names), BASE_ADAPTER]
    mixed = score_rows(bone_model, examples, row_slots, batch_size=2, pad_id=pad, device=torch.device("cpu"))

    alone_models = [BoneModel.from_pretrained(copy.deepcopy(base.model), registry.path(n)) for n in names]
    for model, got in zip([*alone_models, base.model], mixed):
        want = evaluate(
            model,
            examples,
            batch_size=1,
            pad_id=pad,
            device=torch.device("cpu"),
            autocast=torch.autocast("cpu", enabled=False),
        )
        assert got.tokens == want.tokens
        assert got.loss == pytest.approx(want.loss, rel=1e-5, abs=1e-6)
        assert got.token_accuracy == want.token_accuracy
    losses = [s.loss for s in mixed]
    assert len({round(x, 4) for x in losses}) == len(losses)  # every adapter really changed the model


def test_batched_greedy_completions_equal_each_adapter_alone(base, registry):
    names = list(VARIANTS)
    bone_model = BoneModel(copy.deepcopy(base.model)).eval()
    slots, _ = load_adapters(bone_model, registry, names, "embedded")
    prompts = completion_prompts(ROWS, base.tokenizer, 64)
    assert [p.reference for p in prompts] == ["four", "hi!", ROWS[3]["completion"]]  # text rows have none
    tok = base.tokenizer
    row_slots = [*(slots[n] for n in names), BASE_ADAPTER]
    mixed = generate_rows(
        bone_model, tok, prompts, row_slots, max_new_tokens=8, pad_id=tok.pad_token_id, device=torch.device("cpu")
    )
    alone_models = [BoneModel.from_pretrained(copy.deepcopy(base.model), registry.path(n)) for n in names]
    for model, texts in zip([*alone_models, base.model], mixed):
        for prompt, text in zip(prompts, texts):
            ids = torch.tensor([prompt.input_ids])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            assert text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def make_eval(store: EvalStore, adapters, records, **fields) -> Evaluation:
    evaluation = Evaluation(
        id=Evaluation.new_id(),
        adapters=adapters,
        base_model="embedded",
        dataset=dataset_summary(RecordsDataset(records=records)),
        **{"max_examples": 1000, "batch_size": 8, "max_seq_length": 64, "max_new_tokens": 16, **fields},
    )
    store.create(evaluation, records=records)
    return evaluation


def run_queued(redis_conn, settings, task, *ids):
    queue = Queue(settings.queue_name, connection=redis_conn)
    for i in ids:
        queue.enqueue(task, i, job_id=i, job_timeout=settings.job_timeout_s)
    SimpleWorker([queue], connection=redis_conn).work(burst=True)


def test_a_memorizing_adapter_scores_exact_match_and_beats_the_base(task_settings, redis_conn, store, make_job):
    job = make_job(
        MEMORIZE_RECORDS, adapter_name="memorized", bone=MEMORIZE_RECIPE["bone"], **MEMORIZE_RECIPE["training"]
    )
    run_queued(redis_conn, task_settings, "worker.tasks.run_training_job", job.id)
    assert store.get(job.id).status is JobStatus.SUCCEEDED, store.get(job.id).error

    evals = EvalStore(redis_conn)
    evaluation = make_eval(evals, ["memorized"], MEMORIZE_RECORDS, batch_size=4)  # 6 rows: a short last batch
    run_queued(redis_conn, task_settings, EVAL_TASK, evaluation.id)

    done = evals.get(evaluation.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    tuned, plain = done.results["memorized"], done.results[BASE_ADAPTER]
    assert (tuned.examples, tuned.exact_match_examples) == (6, 6)
    assert tuned.exact_match == 1.0 and plain.exact_match == 0.0
    assert tuned.loss < plain.loss and tuned.perplexity < plain.perplexity
    assert tuned.token_accuracy > plain.token_accuracy and tuned.tokens == plain.tokens > 0
    assert done.progress["examples_done"] == 6 and done.started_at <= done.finished_at

    sha = AdapterRegistry(task_settings.registry_dir).get("memorized").sha256
    latest = evals.latest("memorized", sha256=sha)
    assert latest.eval_id == done.id and latest.metrics == tuned and latest.base == plain
    assert evals.latest("memorized", sha256="0" * 64) is None  # another version of the adapter: not its eval


def test_an_evaluation_of_a_missing_adapter_fails_naming_it(task_settings, redis_conn):
    evals = EvalStore(redis_conn)
    evaluation = make_eval(evals, ["gone"], [{"text": "hello"}])
    run_queued(redis_conn, task_settings, EVAL_TASK, evaluation.id)
    done = evals.get(evaluation.id)
    assert done.status is JobStatus.FAILED and "'gone'" in done.error and done.results == {}


def test_a_cancelled_evaluation_never_runs(task_settings, redis_conn):
    evals = EvalStore(redis_conn)
    evaluation = make_eval(evals, ["gone"], [{"text": "hello"}])
    evals.request_cancel(evaluation.id)
    run_queued(redis_conn, task_settings, EVAL_TASK, evaluation.id)
    done = evals.get(evaluation.id)
    assert done.status is JobStatus.CANCELLED and done.started_at is None and done.error is None
