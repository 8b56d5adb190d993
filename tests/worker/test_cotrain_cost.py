"""What a co-training group costs its members (worker/cotrain_cost.py): the line fitted through two timings, the
admission rule on it, and a measurement that leaves the model and the RNG exactly as they were."""

from __future__ import annotations

import copy

import pytest
import torch

from bone import BoneConfig, get_bone_model
from worker.cotrain_cost import StepCost, admits

CPU = torch.device("cpu")


def test_a_line_through_the_two_timings():
    cost = StepCost.from_timings(rows=2, alone_s=1.2, doubled_s=1.4)  # 0.1 s a row on top of a fixed 1.0 s
    assert cost.per_row_s == pytest.approx(0.1) and cost.fixed_s == pytest.approx(1.0)
    assert cost.seconds(8) == pytest.approx(1.8)
    assert cost.slowdown(8, 2) == pytest.approx(1.8 / 1.2)


def test_noise_never_makes_rows_free_of_cost_or_time_negative():
    faster = StepCost.from_timings(rows=4, alone_s=1.0, doubled_s=0.9)  # an idle GPU's noise: "free" rows
    assert faster.per_row_s == 0 and faster.fixed_s == pytest.approx(1.0)
    assert faster.slowdown(64, 4) == pytest.approx(1.0)
    steep = StepCost.from_timings(rows=1, alone_s=1.0, doubled_s=2.5)  # worse than linear: no negative fixed part
    assert steep.fixed_s == 0 and steep.per_row_s == pytest.approx(1.5)
    assert steep.slowdown(2, 1) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "members, candidate, bound, joins",
    [
        ([2], 2, 1.2, False),  # CPU-like: proportional to rows, twice the rows take twice as long
        ([2], 2, 2.0, True),
        ([2], 2, 0, True),  # 0: no bound
        ([4], 1, 1.3, False),  # the candidate itself is slowed too: 5 rows vs its own 1
    ],
)
def test_admission_on_a_saturated_device(members, candidate, bound, joins):
    proportional = StepCost(fixed_s=0.0, per_row_s=1.0, measured_rows=2, measured_s=(2.0, 4.0))
    assert admits(proportional, members, candidate, bound) is joins


def test_admission_on_a_device_one_job_leaves_idle():
    idle = StepCost(fixed_s=1.0, per_row_s=0.01, measured_rows=2, measured_s=(1.02, 1.04))
    group: list[int] = [2]
    while admits(idle, group, 2, 1.2) and len(group) < 64:
        group.append(2)
    assert len(group) == 11  # 1 + 0.01 x 20 = 1.2 x 1.0 ... the 11th keeps 22 rows at 1.22 / 1.02 = 1.196


def test_measuring_changes_nothing_the_training_sees(base):
    model = get_bone_model(copy.deepcopy(base.model), BoneConfig(r=4), adapter_name="job")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    cost = StepCost.measure(model, rows=2, length=16, device=CPU)
    assert cost is not None and cost.measured_rows == 2
    assert all(s > 0 for s in cost.measured_s) and cost.seconds(2) > 0
    assert torch.equal(torch.get_rng_state(), rng)  # the next job's dropout / data order draw the same numbers
    for name, p in model.named_parameters():
        assert p.requires_grad is ("bone_block" in name), name  # the blocks train again, the base stays frozen
        assert p.grad is None, name  # nothing accumulated into a block's gradient
        assert torch.equal(p, params[name]), name
    assert StepCost.measure(model, rows=2, length=16, device=CPU) is cost  # once per model and shape
    assert StepCost.measure(model, rows=2, length=32, device=CPU) is not cost


def test_the_measure_is_kept_a_day_and_an_unreadable_or_stale_one_is_taken_again(redis_conn):
    import json
    import time

    from worker.cotrain_task import COST_KEY, COST_TTL_S, cached_step_cost

    calls = []

    def measure():
        calls.append(1)
        return StepCost.from_timings(2, 1.0, 1.5)

    first = cached_step_cost(redis_conn, "host|cpu|m|fp32|2|64", measure)
    again = cached_step_cost(redis_conn, "host|cpu|m|fp32|2|64", measure)
    assert len(calls) == 1 and again == first
    assert 0 < redis_conn.ttl(COST_KEY) <= COST_TTL_S  # the whole hash goes a day after its last entry
    stale = json.loads(redis_conn.hget(COST_KEY, "host|cpu|m|fp32|2|64"))
    stale["at"] = time.time() - COST_TTL_S - 1
    redis_conn.hset(COST_KEY, "host|cpu|m|fp32|2|64", json.dumps(stale))
    cached_step_cost(redis_conn, "host|cpu|m|fp32|2|64", measure)
    redis_conn.hset(COST_KEY, "host|cpu|m|fp32|4|64", b"{not json")
    cached_step_cost(redis_conn, "host|cpu|m|fp32|4|64", measure)
    assert len(calls) == 3
    assert cached_step_cost(redis_conn, "host|cpu|m|fp32|8|64", lambda: None) is None  # nothing kept for None
    assert not redis_conn.hexists(COST_KEY, "host|cpu|m|fp32|8|64")


def test_the_measured_length_is_the_datas_rounded_up_and_never_past_max_seq_length(base):
    from core.jobs import BoneSpec, Job, TrainingSpec
    from worker.cotrain_task import padded_length

    def job(**training):
        spec = TrainingSpec(**training)
        return Job(
            id=Job.new_id(),
            adapter_name="a",
            base_model="embedded",
            dataset={"records": 1},
            bone=BoneSpec(),
            training=spec,
        )

    rows = [{"prompt": "Q: capital of France?\nA:", "completion": " Paris."}] * 3
    assert padded_length(job(max_seq_length=512), base.tokenizer, rows) == 64
    assert padded_length(job(max_seq_length=40), base.tokenizer, rows) == 40  # never past the job's own bound
    long_rows = [{"prompt": "x" * 300, "completion": "y"}]
    assert padded_length(job(max_seq_length=512), base.tokenizer, long_rows) in (320, 384)
    assert padded_length(job(max_seq_length=512, packing=True), base.tokenizer, rows) == 512
    assert padded_length(job(max_seq_length=512), base.tokenizer, [{"bogus": 1}]) == 512  # unreadable: the bound
