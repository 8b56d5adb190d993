"""Mixed batches run per segment (rows grouped by adapter, each block read once, never copied per row): a
batch over several adapters and the base equals each row run alone, in float32 and bfloat16; the working
bytes are counted and the Bat budget bounds what the plans hold."""

from __future__ import annotations

import pytest
import torch

from bone import BASE_ADAPTER, BoneConfig, get_bone_model
from bone import routing as R
from tests.bone.tiny import build, ids, randomize, targets

# 5 rows over 3 adapters + the base, rows of one adapter not contiguous (index segments) and contiguous (slices)
NAMES = ["a", "b", "a", BASE_ADAPTER, "c"]


def three_adapters(dtype: torch.dtype, bat: bool = False):
    t = targets("llama")
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=t, init_weights=False), "a")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=t, init_weights=False))
    third = BoneConfig(r=4, target_modules=t, init_weights="bat") if bat else BoneConfig(r=2, target_modules=t[:2])
    bm.add_adapter("c", third)
    randomize(bm, 0.05)
    bm.eval()
    return bm.to(dtype)


@pytest.mark.parametrize("bat", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_over_three_adapters_and_base_equals_each_row_alone(dtype, bat):
    bm = three_adapters(dtype, bat)
    x = ids(batch=len(NAMES), seq=6)
    with torch.no_grad():
        with bm.routing(NAMES) as routed:
            together = routed(input_ids=x).logits.float()
            kinds = {layer.row_plan.kind for _, layer in bm.bone_layers()}
            assert kinds == {R.PlanKind.SEGMENTS}
            for _, layer in bm.bone_layers():  # no per-row copy: every segment holds the adapter's own block
                for _, segs in layer.row_plan.bone:  # (half precision on CPU: its one fp32 widening, per adapter)
                    for *_, blk in segs:
                        own = [layer.full_block(n) for n in layer.bone_block]
                        assert blk.dim() == 2 and any(
                            blk is b or (blk.dtype != b.dtype and torch.equal(blk, b.float())) for b in own
                        )
            assert routed.working_bytes > 0
        for i, name in enumerate(NAMES):
            alone = bm(input_ids=x[i : i + 1], adapter_names=[name]).logits.float()
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(together[i : i + 1], alone, atol=tol, rtol=tol)
    assert all(layer.row_plan is None for _, layer in bm.bone_layers())


def test_segments_carry_gradients_to_each_rows_adapter():
    bm = three_adapters(torch.float32)
    x = ids(batch=len(NAMES), seq=4)
    for p in bm.parameters():
        p.requires_grad_(False)
    blk = bm.bone_layers()[0][1].bone_block
    for n in ("a", "b"):
        blk[n].requires_grad_(True)
    loss = bm(input_ids=x[:2], adapter_names=["a", BASE_ADAPTER]).logits.sum()
    loss.backward()
    assert blk["a"].grad is not None and blk["a"].grad.abs().sum() > 0
    assert blk["b"].grad is None  # no row used it


def test_bat_budget_bounds_what_the_plans_hold_and_outputs_do_not_change():
    bm = three_adapters(torch.float32, bat=True)
    x = ids(batch=len(NAMES), seq=5)
    with torch.no_grad():
        with bm.routing(NAMES) as unbounded:
            want = unbounded(input_ids=x).logits
            held = unbounded._routing.held_bytes
        with bm.routing(NAMES, bat_budget_bytes=0) as bounded:
            got = bounded(input_ids=x).logits
            assert bounded._routing.held_bytes < held  # no dense Bat weight kept between forwards
            assert all(w is None for _, layer in bm.bone_layers() for _, _, w in layer.row_plan.bat)
    torch.testing.assert_close(got, want)


def four_adapters(dtype: torch.dtype = torch.float32):
    t = targets("llama")
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=t, init_weights=False), "a")
    for name in "bcd":
        bm.add_adapter(name, BoneConfig(r=4, target_modules=t, init_weights=False))
    randomize(bm, 0.05)
    bm.eval()
    return bm.to(dtype)


@pytest.mark.parametrize(
    "names, in_order",
    [
        (["a", "b", "c", "d"], True),  # a mixed decode batch: every row its own adapter, in order -> baddbmm_
        (["d", BASE_ADAPTER, "b", "c", "c"], False),  # two one-row adapters among others -> one bmm + index_add_
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_adapters_share_one_stacked_gemm_and_equal_each_row_alone(names, in_order, dtype):
    bm = four_adapters(dtype)
    x = ids(batch=len(names), seq=5)
    one_row = [n for n in dict.fromkeys(names) if names.count(n) == 1 and n != BASE_ADAPTER]
    with torch.no_grad():
        with bm.routing(names) as routed:
            together = routed(input_ids=x).logits.float()
            for _, layer in bm.bone_layers():
                rows, stack = layer.row_plan.singles[4]
                assert rows.tolist() == [names.index(n) for n in one_row]
                assert stack.shape[0] == len(one_row)
                assert (rows.numel() == len(names)) is in_order
            stacked = routed._routing.held_bytes + routed._routing.stacks.held_bytes
        with bm.routing(names, bat_budget_bytes=0) as bounded:  # no room for the copies: one gemm per adapter
            got = bounded(input_ids=x).logits.float()
            if dtype == torch.float32:  # the stacks are copies: held only within the budget
                assert all(not layer.row_plan.singles for _, layer in bm.bone_layers())
                assert bounded._routing.held_bytes + bounded._routing.stacks.held_bytes < stacked
            else:  # bf16 on the CPU stacks the fp32 copies it holds anyway (widened plans): no budget needed
                assert all(layer.row_plan.singles for _, layer in bm.bone_layers())
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, together, atol=tol, rtol=tol)
        for i, name in enumerate(names):
            alone = bm(input_ids=x[i : i + 1], adapter_names=[name]).logits.float()
            torch.testing.assert_close(together[i : i + 1], alone, atol=tol, rtol=tol)
