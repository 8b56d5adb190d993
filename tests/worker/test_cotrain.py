"""Co-training (worker/cotrain.py): every job's adapter trained in a group equals the same job trained alone by
``worker.train.train`` with the same seed, within 1e-5 (fp32, CPU), whatever the others in its group do.

The gradients agree within ~6e-7 of their scale (float rounding: the routed path sums in another order than
the lone one, rows are padded to another width); AdamW normalises each element, so that rounding reaches the
weights as roughly lr x steps x (the gradient's relative error on its smallest elements). The learning rates
here (1e-3 to 5e-3, up to 9 steps) keep it under 1e-5 with a 3x margin; at lr 1e-2 it reaches ~3e-5. A wrong
loss normalisation (e.g. per micro-batch instead of per step) breaks the accumulating and clipped jobs by 1e-2."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bone import BoneConfig, BoneModel, get_bone_model
from core.jobs import TrainingSpec
from core.names import TRAINING_SLOT
from worker.cotrain import Member, cotrain
from worker.data import Cancelled, tokenize_rows
from worker.train import train

CPU = torch.device("cpu")


def _rows(kind: int, n: int) -> list[dict[str, str]]:
    """A small dataset per job, with lengths that differ within it and between jobs (padding differs)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    return [
        {
            "prompt": f"{words[(i + kind) % 6]} {i}" + "!" * (i % (kind + 2)),
            "completion": f" {kind * 7 + i}" * (1 + i % 3),
        }
        for i in range(n)
    ]


# Four different jobs: Bone and Bat, different r, learning rates, schedulers, batch sizes, accumulation, lengths.
JOBS = {
    "job-a": (BoneConfig(r=8), dict(max_steps=7, batch_size=2, learning_rate=1e-3, lr_scheduler="linear", seed=1)),
    "job-b": (
        BoneConfig(r=4, init_weights="bat"),
        dict(max_steps=5, batch_size=3, learning_rate=3e-3, lr_scheduler="cosine", warmup_steps=2, seed=2),
    ),
    "job-c": (
        BoneConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        dict(
            epochs=2,
            batch_size=2,
            gradient_accumulation_steps=3,
            learning_rate=5e-3,
            lr_scheduler="constant",
            group_by_length=True,
            max_grad_norm=0.05,
            seed=3,
        ),
    ),
    "job-d": (
        BoneConfig(r=8),
        dict(max_steps=9, batch_size=1, gradient_accumulation_steps=2, learning_rate=4e-3, weight_decay=0.1, seed=4),
    ),
}


@pytest.fixture(scope="module")
def datasets(base):
    return {key: tokenize_rows(_rows(k, 7 + 2 * k), base.tokenizer, 48).examples for k, key in enumerate(JOBS)}


def _alone(base, key, examples, tmp: Path, **kw) -> dict[str, torch.Tensor]:
    config, training = JOBS[key]
    model = get_bone_model(copy.deepcopy(base.model), config, adapter_name=TRAINING_SLOT)
    train(model, base.tokenizer, examples, TrainingSpec(**training), device=CPU, **kw)
    out = tmp / f"alone-{key}"
    model.save_pretrained(out, adapter_name=TRAINING_SLOT)
    return load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def alone(base, datasets, tmp_path_factory):
    """Each job trained alone, once for the module."""
    tmp = tmp_path_factory.mktemp("alone")
    return {key: _alone(base, key, datasets[key], tmp) for key in JOBS}


def _member(key, examples, tmp: Path, outcomes: dict, **kw) -> Member:
    config, training = JOBS[key]

    def done(member, result, error):
        outcomes[member.key] = (result, error)

    return Member(
        key=key,
        config=config,
        examples=examples,
        spec=TrainingSpec(**training),
        adapter_dir=tmp / f"group-{key}",
        on_done=done,
        **kw,
    )


def _adapter(tmp: Path, key: str) -> dict[str, torch.Tensor]:
    return load_file(tmp / f"group-{key}" / "adapter_model.safetensors")


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert not torch.equal(want[name], torch.zeros_like(want[name])), "the adapter did not train"
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_each_job_in_a_group_equals_the_job_alone(base, datasets, alone, tmp_path):
    outcomes: dict = {}
    members = [_member(key, datasets[key], tmp_path, outcomes) for key in JOBS]
    iterations = []
    cotrain(
        BoneModel(copy.deepcopy(base.model)),
        base.tokenizer,
        members,
        device=CPU,
        on_iteration=lambda rows, s: iterations.append(rows),
    )
    assert {k: e for k, (_, e) in outcomes.items()} == dict.fromkeys(JOBS)
    assert max(len(rows) for rows in iterations) == 4  # they really shared forwards
    for key in JOBS:
        _assert_equal(_adapter(tmp_path, key), alone[key])
    assert outcomes["job-a"][0].steps == 7 and outcomes["job-b"][0].steps == 5


def test_a_member_joining_after_k_steps_equals_alone(base, datasets, alone, tmp_path):
    outcomes: dict = {}
    steps_of_a: list[int] = []
    late = _member("job-b", datasets["job-b"], tmp_path, outcomes)
    first = _member(
        "job-a", datasets["job-a"], tmp_path, outcomes, on_step=lambda step, *a, **kw: steps_of_a.append(step)
    )
    joined_at: list[int] = []

    def poll(room: int):
        if steps_of_a and steps_of_a[-1] >= 3 and not joined_at:
            joined_at.append(steps_of_a[-1])
            return [late]
        return []

    cotrain(BoneModel(copy.deepcopy(base.model)), base.tokenizer, [first], device=CPU, poll=poll, poll_every_s=0)
    assert joined_at == [3]
    assert outcomes["job-a"][1] is None and outcomes["job-b"][1] is None
    _assert_equal(_adapter(tmp_path, "job-a"), alone["job-a"])
    _assert_equal(_adapter(tmp_path, "job-b"), alone["job-b"])


def test_cancelling_one_of_four_leaves_the_others_equal_to_alone(base, datasets, alone, tmp_path):
    outcomes: dict = {}
    steps: dict[str, int] = {}

    def counter(key):
        def on_step(step, *args, **kw):
            steps[key] = step

        return on_step

    members = [_member(key, datasets[key], tmp_path, outcomes, on_step=counter(key)) for key in JOBS]
    members[2].should_stop = lambda: steps.get("job-c", 0) >= 1  # cancelled after its first step
    model = BoneModel(copy.deepcopy(base.model))
    cotrain(model, base.tokenizer, members, device=CPU)
    assert isinstance(outcomes["job-c"][1], Cancelled)
    assert not (tmp_path / "group-job-c").exists()
    assert not model.adapter_configs  # every slot given back
    for key in ("job-a", "job-b", "job-d"):
        assert outcomes[key][1] is None
        _assert_equal(_adapter(tmp_path, key), alone[key])


def test_a_failing_member_leaves_and_the_others_go_on(base, datasets, alone, tmp_path):
    outcomes: dict = {}

    def explode(kind, message="", **data):
        if kind == "epoch":
            raise RuntimeError("its own reporting broke")

    members = [
        _member("job-a", datasets["job-a"], tmp_path, outcomes),
        _member("job-c", datasets["job-c"], tmp_path, outcomes, on_event=explode),
    ]
    cotrain(BoneModel(copy.deepcopy(base.model)), base.tokenizer, members, device=CPU)
    assert isinstance(outcomes["job-c"][1], RuntimeError)
    _assert_equal(_adapter(tmp_path, "job-a"), alone["job-a"])


def test_a_checkpoint_resumed_in_another_group_equals_the_uninterrupted_run(base, datasets, alone, tmp_path):
    """job-d checkpoints every 2 steps in a group with job-a and is cancelled after step 5; a new group (with
    job-b) resumes it from its own newest checkpoint (step 4): the result equals job-d trained alone."""
    outcomes: dict = {}
    steps: list[int] = []
    ckpt = tmp_path / "ckpt-d"
    events: list[tuple[str, dict]] = []
    spec = TrainingSpec(**{**JOBS["job-d"][1], "save_every": 2})

    def first_d(**kw):
        m = _member("job-d", datasets["job-d"], tmp_path, outcomes, checkpoint_dir=ckpt, **kw)
        m.spec = spec
        return m

    d = first_d(on_step=lambda step, *a, **kw: steps.append(step))
    d.should_stop = lambda: bool(steps) and steps[-1] >= 5
    cotrain(
        BoneModel(copy.deepcopy(base.model)),
        base.tokenizer,
        [_member("job-a", datasets["job-a"], tmp_path, outcomes), d],
        device=CPU,
    )
    assert isinstance(outcomes["job-d"][1], Cancelled)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000002", "step-00000004"]

    again = first_d(on_event=lambda kind, message="", **data: events.append((kind, data)))
    cotrain(
        BoneModel(copy.deepcopy(base.model)),
        base.tokenizer,
        [_member("job-b", datasets["job-b"], tmp_path, outcomes), again],
        device=CPU,
    )
    assert ("resumed", {"step": 4}) in events
    assert outcomes["job-d"][1] is None and outcomes["job-d"][0].resumed_from == 4
    _assert_equal(_adapter(tmp_path, "job-d"), alone["job-d"])
    _assert_equal(_adapter(tmp_path, "job-b"), alone["job-b"])


def test_a_lone_jobs_checkpoint_resumes_in_a_group(base, datasets, alone, tmp_path):
    """Checkpoints name parameters as a lone job does: an attempt alone, then one in a group, equals alone."""
    ckpt = tmp_path / "ckpt-a"
    config, training = JOBS["job-a"]
    spec = TrainingSpec(**{**training, "save_every": 3})
    model = get_bone_model(copy.deepcopy(base.model), config, adapter_name=TRAINING_SLOT)
    steps: list[int] = []
    with pytest.raises(Cancelled):
        train(
            model,
            base.tokenizer,
            datasets["job-a"],
            spec,
            device=CPU,
            checkpoint_dir=ckpt,
            on_step=lambda step, *a: steps.append(step),
            should_stop=lambda: bool(steps) and steps[-1] >= 4,
        )
    outcomes: dict = {}
    member = _member("job-a", datasets["job-a"], tmp_path, outcomes, checkpoint_dir=ckpt)
    member.spec = spec
    cotrain(
        BoneModel(copy.deepcopy(base.model)),
        base.tokenizer,
        [member, _member("job-b", datasets["job-b"], tmp_path, outcomes)],
        device=CPU,
    )
    assert outcomes["job-a"][0].resumed_from == 3
    _assert_equal(_adapter(tmp_path, "job-a"), alone["job-a"])


def test_eval_and_early_stopping_follow_each_members_own_adapter(base, datasets, tmp_path):
    """Eval rows run on the member's own adapter only: the group's eval history equals the lone run's."""
    key = "job-a"
    config, training = JOBS[key]
    spec = TrainingSpec(**{**training, "eval_every": 2, "max_steps": 6})
    evals_alone: list = []
    model = get_bone_model(copy.deepcopy(base.model), config, adapter_name=TRAINING_SLOT)
    result = train(model, base.tokenizer, datasets[key], spec, device=CPU, eval_examples=datasets["job-b"][:4])
    evals_alone = result.evals
    outcomes: dict = {}
    member = _member(key, datasets[key], tmp_path, outcomes, eval_examples=datasets["job-b"][:4])
    member.spec = spec
    cotrain(
        BoneModel(copy.deepcopy(base.model)),
        base.tokenizer,
        [member, _member("job-d", datasets["job-d"], tmp_path, outcomes)],
        device=CPU,
    )
    got = outcomes[key][0].evals
    assert [e["step"] for e in got] == [e["step"] for e in evals_alone] == [2, 4, 6]
    for g, w in zip(got, evals_alone):
        assert g["eval_loss"] == pytest.approx(w["eval_loss"], abs=1e-5)


def test_a_packed_job_and_unpacked_ones_share_a_group_each_as_alone(base, datasets, alone, tmp_path):
    """A packed member makes the whole micro-batch use packed collation (position ids, no 2-D mask): every
    unpacked row is then one segment, which computes what its padded, masked self computes."""
    from worker.data import pack

    config, training = BoneConfig(r=8), dict(max_steps=5, batch_size=2, learning_rate=2e-3, packing=True, seed=5)
    packed = pack(datasets["job-c"], 48, 5)
    assert any(ex.segments is not None and len(ex.segments) > 1 for ex in packed)
    model = get_bone_model(copy.deepcopy(base.model), config, adapter_name=TRAINING_SLOT)
    train(model, base.tokenizer, packed, TrainingSpec(**training), device=CPU)
    model.save_pretrained(tmp_path / "alone-packed", adapter_name=TRAINING_SLOT)
    outcomes: dict = {}
    members = [
        _member("job-a", datasets["job-a"], tmp_path, outcomes),
        Member(
            key="job-p",
            config=config,
            examples=packed,
            spec=TrainingSpec(**training),
            adapter_dir=tmp_path / "group-job-p",
            on_done=lambda m, r, e: outcomes.__setitem__(m.key, (r, e)),
        ),
    ]
    cotrain(BoneModel(copy.deepcopy(base.model)), base.tokenizer, members, device=CPU)
    assert outcomes["job-p"][1] is None and outcomes["job-a"][1] is None
    _assert_equal(_adapter(tmp_path, "job-p"), load_file(tmp_path / "alone-packed" / "adapter_model.safetensors"))
    _assert_equal(_adapter(tmp_path, "job-a"), alone["job-a"])
