import copy
import math

import pytest
import torch

from bone import BoneConfig, get_bone_model
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
@pytest.mark.parametrize("schedule, warmup, step, expected", [
    ("constant", 0, 0, 1.0), ("constant", 0, 9, 1.0),
    ("constant", 4, 0, 0.2), ("constant", 4, 3, 0.8), ("constant", 4, 4, 1.0),
    ("linear", 0, 0, 1.0), ("linear", 0, 5, 0.5), ("linear", 0, 9, 0.1), ("linear", 0, 10, 0.0),
    ("linear", 2, 1, 2 / 3), ("linear", 2, 2, 1.0), ("linear", 2, 6, 0.5),
    ("cosine", 0, 0, 1.0), ("cosine", 0, 5, 0.5), ("cosine", 0, 10, 0.0),
    ("cosine", 2, 4, 0.5 * (1 + math.cos(math.pi * 2 / 8))),
])
def test_get_lr(schedule, warmup, step, expected):
    lr = get_lr(step, base_lr=2.0, schedule=schedule, warmup_steps=warmup, total_steps=10)
    assert lr == pytest.approx(2.0 * expected)


@pytest.mark.parametrize("spec, n, expected", [
    (dict(epochs=1, batch_size=4), 12, 3),
    (dict(epochs=1, batch_size=5), 12, 3),  # the last short batch counts
    (dict(epochs=2.5, batch_size=4), 12, 8),
    (dict(epochs=1, batch_size=2, gradient_accumulation_steps=3), 12, 2),
    (dict(epochs=1, batch_size=4, gradient_accumulation_steps=2), 12, 2),
    (dict(epochs=3, max_steps=7), 12, 7),  # max_steps wins
])
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
    result = train(wrapped, base.tokenizer, examples, TrainingSpec(max_steps=15, learning_rate=1e-2, batch_size=12),
                   device=CPU, on_step=lambda *args: calls.append(args))
    assert result.steps == 15 and len(result.losses) == 15
    assert result.final_loss < 0.7 * result.losses[0]
    assert [c[0] for c in calls] == list(range(1, 16)) and {c[1] for c in calls} == {15}
    step, total, loss, lr, grad_norm, tokens_per_s = calls[-1]
    assert loss == result.final_loss and lr == pytest.approx(1e-2 / 15) and grad_norm > 0 and tokens_per_s > 0
    adapter = wrapped.get_adapter_state_dict("default")
    assert all(t.abs().sum() > 0 for t in adapter.values())  # zero-initialised blocks moved
    assert not any(name in frozen for name in adapter)
    # The base weights inside the wrapper are untouched (only bone_* tensors were optimised).
    wrapped_base = {k.replace(".base_layer", ""): v for k, v in wrapped.base_model.state_dict().items() if "bone_" not in k}
    assert all(torch.equal(wrapped_base[k], v) for k, v in frozen.items())


def test_same_seed_same_adapter_bytes(base, examples, tmp_path):
    def run(seed, out):
        model = get_bone_model(copy.deepcopy(base.model), BoneConfig(r=8))
        # batch < dataset, so the seed decides the order of the examples
        train(model, base.tokenizer, examples, TrainingSpec(max_steps=4, batch_size=3, learning_rate=1e-2, seed=seed),
              device=CPU)
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
        spec = TrainingSpec(max_steps=1, batch_size=batch_size, gradient_accumulation_steps=accumulation,
                            learning_rate=1e-2, max_grad_norm=None)
        result = train(model, base.tokenizer, varied, spec, device=CPU)
        results.append((result.final_loss, model.get_adapter_state_dict("default")))
    (loss_a, sd_a), (loss_b, sd_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=1e-4, atol=1e-7)


def test_should_stop_raises_cancelled_between_steps(base, wrapped, examples):
    steps = []
    with pytest.raises(Cancelled):
        train(wrapped, base.tokenizer, examples, TrainingSpec(max_steps=50), device=CPU,
              on_step=lambda step, *rest: steps.append(step), should_stop=lambda: len(steps) >= 3)
    assert steps == [1, 2, 3]
