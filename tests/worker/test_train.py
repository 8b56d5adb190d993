import copy
import math

import pytest
import torch

from bone import BoneConfig, BoneModel, get_bone_model
from core.jobs import TrainingSpec
from worker.data import IGNORE_INDEX, Example, tokenize_rows
from worker.train import Cancelled, collate, count_steps, get_lr, train

CPU = torch.device("cpu")
ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(3)]


@pytest.fixture
def wrapped(base):
    """A fresh Bone-wrapped copy of the embedded model (wrapping changes modules in place)."""
    return get_bone_model(copy.deepcopy(base.model), BoneConfig(r=8))


@pytest.fixture
def examples(base):
    return tokenize_rows(ROWS, base.tokenizer, 32).examples


# --- pure helpers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule, warmup, step, expected",
    [
        ("constant", 0, 0, 1.0),
        ("constant", 0, 9, 1.0),
        ("constant", 4, 0, 0.2),
        ("constant", 4, 3, 0.8),
        ("constant", 4, 4, 1.0),
        ("linear", 0, 0, 1.0),
        ("linear", 0, 5, 0.5),
        ("linear", 0, 9, 0.1),
        ("linear", 0, 10, 0.0),
        ("linear", 2, 1, 2 / 3),
        ("linear", 2, 2, 1.0),
        ("linear", 2, 6, 0.5),
        ("cosine", 0, 0, 1.0),
        ("cosine", 0, 5, 0.5),
        ("cosine", 0, 10, 0.0),
        ("cosine", 2, 4, 0.5 * (1 + math.cos(math.pi * 2 / 8))),
    ],
)
def test_get_lr(schedule, warmup, step, expected):
    lr = get_lr(step, base_lr=2.0, schedule=schedule, warmup_steps=warmup, total_steps=10)
    assert lr == pytest.approx(2.0 * expected)


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        (dict(epochs=1, batch_size=4), 12, 3),
        (dict(epochs=1, batch_size=5), 12, 3),  # the last short batch counts
        (dict(epochs=2.5, batch_size=4), 12, 8),
        (dict(epochs=1, batch_size=2, gradient_accumulation_steps=3), 12, 2),
        (dict(epochs=1, batch_size=4, gradient_accumulation_steps=2), 12, 2),
        (dict(epochs=3, max_steps=7), 12, 7),  # max_steps wins
    ],
)
def test_count_steps(spec, n, expected):
    assert count_steps(n, TrainingSpec(**spec)) == expected


def test_collate_pads_right_with_no_attention_and_no_loss():
    batch = collate([Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4], [4])], pad_id=0, device=CPU)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


# --- the loop ---------------------------------------------------------------------------------------------
def test_loss_falls_and_only_the_adapter_changes(base, wrapped, examples):
    frozen = {k: v.clone() for k, v in base.model.state_dict().items()}
    calls = []
    result = train(
        wrapped,
        base.tokenizer,
        examples,
        TrainingSpec(max_steps=15, learning_rate=1e-2, batch_size=12),
        device=CPU,
        on_step=lambda *args: calls.append(args),
    )
    assert result.steps == 15 and len(result.losses) == 15
    assert result.final_loss < 0.7 * result.losses[0]
    assert [c[0] for c in calls] == list(range(1, 16)) and {c[1] for c in calls} == {15}
    step, total, loss, lr, grad_norm, tokens_per_s = calls[-1]
    assert loss == result.final_loss and lr == pytest.approx(1e-2 / 15) and grad_norm > 0 and tokens_per_s > 0
    adapter = wrapped.get_adapter_state_dict("default")
    assert all(t.abs().sum() > 0 for t in adapter.values())  # zero-initialised blocks moved
    assert not any(name in frozen for name in adapter)
    # The base weights inside the wrapper are untouched (only bone_* tensors were optimised).
    wrapped_base = {
        k.replace(".base_layer", ""): v for k, v in wrapped.base_model.state_dict().items() if "bone_" not in k
    }
    assert all(torch.equal(wrapped_base[k], v) for k, v in frozen.items())


def test_same_seed_same_adapter_bytes(base, examples, tmp_path):
    def run(seed, out):
        model = get_bone_model(copy.deepcopy(base.model), BoneConfig(r=8))
        # batch < dataset, so the seed decides the order of the examples
        train(
            model,
            base.tokenizer,
            examples,
            TrainingSpec(max_steps=4, batch_size=3, learning_rate=1e-2, seed=seed),
            device=CPU,
        )
        model.save_pretrained(out)
        return (out / "adapter_model.safetensors").read_bytes()

    first, again, other = run(7, tmp_path / "a"), run(7, tmp_path / "b"), run(8, tmp_path / "c")
    assert first == again
    assert first != other


def test_gradient_accumulation_weights_every_token_the_same(base, examples):
    """4 examples in one batch and the same 4 as 2x2 accumulated micro-batches: one identical update."""
    same_length = [ex for ex in examples if len(ex.input_ids) == len(examples[0].input_ids)][:4]
    varied = same_length[:2] + [ex for ex in examples if len(ex.input_ids) != len(same_length[0].input_ids)][:2]
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = get_bone_model(copy.deepcopy(base.model), BoneConfig(r=8))
        spec = TrainingSpec(
            max_steps=1,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            learning_rate=1e-2,
            max_grad_norm=None,
        )
        result = train(model, base.tokenizer, varied, spec, device=CPU)
        results.append((result.final_loss, model.get_adapter_state_dict("default")))
    (loss_a, sd_a), (loss_b, sd_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    # Adam's first step is ~lr·g/|g|: where |g| is near eps it magnifies float32 summation-order noise (one
    # micro-batch of 4 vs two of 2) to ~1e-6; a token weighted wrongly moves the loss and most elements by ~1e-3.
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize(
    "epochs, batch_size, accumulation, steps",
    [
        (3, 5, 2, 5),  # 3 micro-batches a pass, 2 per step: the 5th step takes the one left, not one more
        (1, 4, 2, 2),
        (2, 12, 1, 2),
    ],
)
def test_epochs_run_exactly_that_many_passes(base, examples, epochs, batch_size, accumulation, steps):
    result = train(
        fresh(base),
        base.tokenizer,
        examples,
        TrainingSpec(epochs=epochs, batch_size=batch_size, gradient_accumulation_steps=accumulation),
        device=CPU,
    )
    assert result.steps == steps and result.epochs == epochs


def test_should_stop_raises_cancelled_between_steps(base, wrapped, examples):
    steps = []
    with pytest.raises(Cancelled):
        train(
            wrapped,
            base.tokenizer,
            examples,
            TrainingSpec(max_steps=50),
            device=CPU,
            on_step=lambda step, *rest: steps.append(step),
            should_stop=lambda: len(steps) >= 3,
        )
    assert steps == [1, 2, 3]


# --- evaluation, early stopping, checkpoints, resume ------------------------------------------------------
def fresh(base):
    return get_bone_model(copy.deepcopy(base.model), BoneConfig(r=8))


def adapter_of(model):
    return {k: v.clone() for k, v in model.get_adapter_state_dict("default").items()}


class Killed(Exception):
    """Stands in for SIGKILL: the loop stops dead, nothing after the last checkpoint survives."""


def test_events_come_in_order_with_evals_epochs_and_checkpoints(base, examples, tmp_path):
    events = []
    spec = TrainingSpec(max_steps=6, batch_size=6, eval_every=2, save_every=3, learning_rate=1e-2)
    result = train(
        fresh(base),
        base.tokenizer,
        examples,
        spec,
        device=CPU,
        eval_examples=examples[:4],
        checkpoint_dir=tmp_path,
        on_step=lambda step, *rest: events.append(("step", step)),
        on_event=lambda kind, message="", **data: events.append((kind, data.get("step", data.get("phase")))),
    )
    kinds = [e for e in events if e[0] != "phase"]
    # 12 examples, batch 6: an epoch every 2 steps. Evals at 2 and 4 (and one at the end), a checkpoint at 3.
    assert kinds == [
        ("step", 1),
        ("step", 2),
        ("epoch", 2),
        ("eval", 2),
        ("step", 3),
        ("checkpoint", 3),
        ("step", 4),
        ("epoch", 4),
        ("eval", 4),
        ("step", 5),
        ("step", 6),
        ("epoch", 6),
        ("eval", 6),
    ]
    assert [e["step"] for e in result.evals] == [2, 4, 6]
    assert all(0 <= e["eval_token_accuracy"] <= 1 and e["eval_loss"] > 0 for e in result.evals)
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"]  # eval on seen rows: it falls


def test_early_stopping_stops_after_patience_evaluations_without_progress(base, examples, monkeypatch):
    import worker.train
    from worker.eval_metrics import EvalResult

    scripted = iter([3.0, 2.0, 2.5, 2.0, 1.0, 9.0])  # best at the 2nd; the 3rd and 4th are no better: stop
    monkeypatch.setattr(worker.train, "evaluate", lambda *a, **k: EvalResult(next(scripted), 0.5, 10))
    spec = TrainingSpec(max_steps=40, eval_every=2, early_stopping_patience=2)
    messages = []
    result = train(
        fresh(base),
        base.tokenizer,
        examples,
        spec,
        device=CPU,
        eval_examples=examples[:4],
        on_event=lambda kind, message="", **data: messages.append(message) if kind == "message" else None,
    )
    assert result.stopped_early and result.steps == 8
    assert [e["eval_loss"] for e in result.evals] == [3.0, 2.0, 2.5, 2.0]  # no extra evaluation at the end
    assert messages == ["stopped early at step 8: no better eval loss in 2 evaluations"]


def test_resume_from_a_checkpoint_gives_the_same_weights_as_an_uninterrupted_run(base, examples, tmp_path):
    spec = TrainingSpec(
        max_steps=9,
        batch_size=5,
        gradient_accumulation_steps=2,
        save_every=3,
        eval_every=4,
        learning_rate=1e-2,
        lr_scheduler="cosine",
        warmup_steps=2,
        weight_decay=0.1,
        seed=3,
    )
    straight = fresh(base)
    whole = train(straight, base.tokenizer, examples, spec, device=CPU, eval_examples=examples[:3])

    def die_after_step_7(step, *rest):
        if step == 7:
            raise Killed()

    with pytest.raises(Killed):
        train(
            fresh(base),
            base.tokenizer,
            examples,
            spec,
            device=CPU,
            eval_examples=examples[:3],
            checkpoint_dir=tmp_path,
            on_step=die_after_step_7,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000006"]
    torch.manual_seed(1234)  # the new process's RNG differs; the checkpoint must restore it
    resumed_model = fresh(base)
    resumed = train(
        resumed_model, base.tokenizer, examples, spec, device=CPU, eval_examples=examples[:3], checkpoint_dir=tmp_path
    )
    assert resumed.resumed_from == 6 and resumed.steps == 9
    assert resumed.losses == whole.losses and resumed.evals == whole.evals
    assert resumed.epochs == whole.epochs and resumed.tokens == whole.tokens
    a, b = adapter_of(straight), adapter_of(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_is_a_publishable_adapter_and_old_ones_are_pruned(base, examples, tmp_path):
    from worker import resume

    model = fresh(base)
    train(
        model,
        base.tokenizer,
        examples,
        TrainingSpec(max_steps=7, save_every=2),
        device=CPU,
        checkpoint_dir=tmp_path,
        checkpoints_kept=2,
    )
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000004", "step-00000006"]
    newest = resume.newest(tmp_path)
    assert newest.name == "step-00000006"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in newest.iterdir()}
    reloaded = BoneModel.from_pretrained(copy.deepcopy(base.model), newest)
    assert reloaded.get_adapter_state_dict("default").keys() == model.get_adapter_state_dict("default").keys()


def test_gradient_checkpointing_gives_the_same_update(base, examples):
    results = []
    for checkpointing in (False, True):
        model = fresh(base)
        train(
            model,
            base.tokenizer,
            examples,
            TrainingSpec(max_steps=2, batch_size=4, learning_rate=1e-2, gradient_checkpointing=checkpointing),
            device=CPU,
        )
        results.append(adapter_of(model))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-7)


def test_packed_examples_train(base, examples):
    from worker.data import pack

    blocks = pack(examples, 16, seed=0)
    assert all(len(b.input_ids) <= 16 for b in blocks) and any(len(b.segments) > 1 for b in blocks)
    result = train(
        fresh(base), base.tokenizer, blocks, TrainingSpec(max_steps=10, batch_size=8, learning_rate=1e-2), device=CPU
    )
    assert result.final_loss < result.losses[0]


def test_cancel_lands_while_evaluating(base, examples):
    calls = []

    def stop_once_evaluating():
        calls.append(1)
        return phase == ["evaluating"]

    phase = []

    def on_event(kind, message="", **data):
        if kind == "phase":
            phase[:] = [data["phase"]]

    with pytest.raises(Cancelled):
        train(
            fresh(base),
            base.tokenizer,
            examples,
            TrainingSpec(max_steps=10, eval_every=2),
            device=CPU,
            eval_examples=examples,
            on_event=on_event,
            should_stop=stop_once_evaluating,
        )
    assert phase == ["evaluating"]
