"""Stacked one-row blocks kept across the routings of a running batch (bone.block_stacks): a join copies only
the newcomer's blocks, a leave only the moved row's, a replaced adapter is copied again, two routings open at
once never read each other's stack, and every output equals each row run alone."""

from __future__ import annotations

import pytest
import torch

from bone import BoneConfig, get_bone_model
from bone.block_stacks import GROWTH, BlockStacks
from tests.bone.tiny import build, ids, randomize, targets

NAMES = "abcdefghij"[: GROWTH + 2]  # more adapters than one slab's first room: a join past it grows the slab


def many_adapters(dtype: torch.dtype = torch.float32):
    t = targets("llama")
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=t, init_weights=False), NAMES[0])
    for name in NAMES[1:]:
        bm.add_adapter(name, BoneConfig(r=4, target_modules=t, init_weights=False))
    randomize(bm, 0.05)
    bm.eval()
    return bm.to(dtype)


def layers(bm) -> int:
    return len(bm.bone_layers())


def run(bm, names: list[str], stacks: BlockStacks, x: torch.Tensor) -> torch.Tensor:
    with bm.routing(names, stacks=stacks) as routed:
        out = routed(input_ids=x).logits.float()
        assert all(layer.row_plan.singles for _, layer in bm.bone_layers())  # really stacked
        return out


def assert_rows_alone(bm, names: list[str], x: torch.Tensor, together: torch.Tensor, tol: float) -> None:
    for i, name in enumerate(names):
        alone = bm(input_ids=x[i : i + 1], adapter_names=[name]).logits.float()
        torch.testing.assert_close(together[i : i + 1], alone, atol=tol, rtol=tol)


def slab_ptrs(bm) -> list[int]:
    return [layer.row_plan.singles[4][1].data_ptr() for _, layer in bm.bone_layers()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_a_join_copies_the_newcomers_blocks_and_a_leave_the_moved_rows(dtype):
    bm = many_adapters(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    stacks = BlockStacks()
    x = ids(batch=len(NAMES), seq=4)
    first = list(NAMES[:3])
    run(bm, first, stacks, x[:3])
    assert stacks.copied_blocks == 3 * layers(bm)
    held = stacks.held_bytes
    with bm.routing(first, stacks=stacks) as routed:
        routed(input_ids=x[:3])
        ptrs = slab_ptrs(bm)

    joined = first + ["d"]  # a join: the newcomer takes the next row
    with bm.routing(joined, stacks=stacks) as routed:
        together = routed(input_ids=x[:4]).logits.float()
        assert slab_ptrs(bm) == ptrs  # the same slab, written in place
    assert stacks.copied_blocks == 4 * layers(bm)  # only d's blocks
    assert stacks.held_bytes == held  # within the slab's first GROWTH positions
    assert_rows_alone(bm, joined, x[:4], together, tol)

    left = ["a", "d", "c"]  # b leaves: the last row moves into its slot (app.engine.kv_store)
    together = run(bm, left, stacks, torch.stack([x[0], x[3], x[2]]))
    assert stacks.copied_blocks == 5 * layers(bm)  # only d's blocks, into b's position
    assert_rows_alone(bm, left, torch.stack([x[0], x[3], x[2]]), together, tol)

    grown = list(NAMES)  # past the slab's room: allocated again once, keeping what it held
    before = stacks.copied_blocks
    together = run(bm, grown, stacks, x)
    assert stacks.held_bytes > held
    # the old slab's GROWTH positions move into the new one once; then a, c and d (still in position 3 from
    # before b left) stay put: b and e..j are written
    assert stacks.copied_blocks - before == (GROWTH + len(NAMES) - 3) * layers(bm)
    assert_rows_alone(bm, grown, x, together, tol)
    stacks.clear()
    assert stacks.held_bytes == 0


@torch.no_grad()
def test_a_replaced_or_changed_adapter_is_copied_again():
    bm = many_adapters()
    stacks = BlockStacks()
    names = ["a", "b", "c"]
    x = ids(batch=3, seq=4)
    run(bm, names, stacks, x)
    t = targets("llama")
    bm.delete_adapter("b")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=t, init_weights=False))
    g = torch.Generator().manual_seed(5)
    for _, layer in bm.bone_layers():
        layer.bone_block["b"].copy_(torch.randn(layer.bone_block["b"].shape, generator=g) * 0.05)
    for change in ("replaced", "changed in place"):
        if change == "changed in place":
            for _, layer in bm.bone_layers():
                layer.bone_block["c"].mul_(2)
        before = stacks.copied_blocks
        together = run(bm, names, stacks, x)
        assert stacks.copied_blocks - before == layers(bm), change  # that adapter's blocks, nothing else
        assert_rows_alone(bm, names, x, together, 1e-5)


@torch.no_grad()
def test_two_open_routings_sharing_stacks_never_read_each_others_blocks():
    bm = many_adapters()
    stacks = BlockStacks()
    x = ids(batch=3, seq=4)
    one, two = ["a", "b", "c"], ["d", "e", "f"]
    with bm.routing(one, stacks=stacks) as first, bm.routing(two, stacks=stacks) as second:
        for _ in range(2):  # alternating, as decode steps and an entering prompt's chunks do
            got_one = first(input_ids=x).logits.float()
            got_two = second(input_ids=x).logits.float()
            assert_rows_alone(bm, one, x, got_one, 1e-5)
            assert_rows_alone(bm, two, x, got_two, 1e-5)


@torch.no_grad()
def test_a_slab_is_held_only_within_the_budget_of_its_routing():
    bm = many_adapters()
    stacks = BlockStacks()
    x = ids(batch=3, seq=4)
    with bm.routing(["a", "b", "c"], bat_budget_bytes=0, stacks=stacks) as routed:
        want = routed(input_ids=x).logits
        assert all(not layer.row_plan.singles for _, layer in bm.bone_layers())  # segments instead
    assert stacks.held_bytes == 0 and stacks.copied_blocks == 0
    with bm.routing(["a", "b", "c"], stacks=stacks) as routed:
        torch.testing.assert_close(routed(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)


def test_block_params_is_the_parameter_dicts_own_storage():
    bm = many_adapters()
    layer = bm.bone_layers()[0][1]
    bm.delete_adapter("b")
    bm.add_adapter("k", BoneConfig(r=4, target_modules=targets("llama"), init_weights=False))
    assert list(layer.block_params) == list(layer.bone_block)
    assert all(layer.block_params[n] is layer.bone_block[n] for n in layer.bone_block)
