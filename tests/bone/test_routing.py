"""``BoneModel.routing``: per-row selection reusable across calls (a serving loop), plans built once per
layer and composition, dropped when a layer changes, released when the block ends."""

from __future__ import annotations

import pytest
import torch

from bone import BASE_ADAPTER, BoneConfig, BoneError, get_bone_model
from bone import routing as R
from tests.bone.tiny import build, ids, randomize, targets


def two_adapters(name="llama"):
    bm = get_bone_model(build(name), BoneConfig(r=4, target_modules=targets(name), init_weights=False), "a")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=targets(name), init_weights=False))
    bm.add_adapter("c", BoneConfig(r=2, target_modules=targets(name)[:2], init_weights=False))
    randomize(bm, 0.05)
    bm.eval()
    return bm


@pytest.fixture
def builds(monkeypatch):
    calls = []
    orig = R.RowPlan.build.__func__
    monkeypatch.setattr(R.RowPlan, "build", classmethod(lambda cls, *a: calls.append(a[0]) or orig(cls, *a)))
    return calls


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("names", [["a", "b", BASE_ADAPTER, "c"], ["a", "a", "a", "a"], [BASE_ADAPTER] * 4])
def test_routed_calls_equal_per_call_selection_and_reuse_the_plans(name, names, builds):
    bm = two_adapters(name)
    x = ids(batch=4, seq=5)
    with torch.no_grad():
        want = bm(input_ids=x, adapter_names=names).logits
        n_layers = len(bm.bone_layers())
        builds.clear()
        with bm.routing(names) as routed:
            for _ in range(3):
                torch.testing.assert_close(routed(input_ids=x).logits, want, atol=0, rtol=0)
        assert len(builds) == n_layers  # once per layer for the whole block, not per call
        assert all(layer.row_plan is None for _, layer in bm.bone_layers())  # released on exit


def test_routed_decode_loop_equals_generate():
    bm = two_adapters()
    names = ["b", "a", BASE_ADAPTER]
    x = ids(batch=3, seq=4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = bm.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=names, **kw)
    with torch.no_grad(), bm.routing(names) as routed:
        got = routed.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        out = routed(input_ids=x, use_cache=True)  # a hand-written loop with a KV cache
        cache_arg = "cache" if hasattr(out, "cache") else "past_key_values"  # renamed in transformers 5.x
        cache, tokens = getattr(out, cache_arg), [out.logits[:, -1].argmax(-1)]
        for _ in range(4):
            out = routed(input_ids=tokens[-1][:, None], use_cache=True, **{cache_arg: cache})
            cache = getattr(out, cache_arg)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(got, want)
    mine, theirs = torch.stack(tokens, 1), want[:, x.shape[1] :]
    eos = bm.generation_config.eos_token_id
    for row in range(len(names)):  # generate pads a row after its EOS; the loop above runs on
        ended = (theirs[row] == eos).nonzero()
        end = int(ended[0]) + 1 if len(ended) else theirs.shape[1]
        assert torch.equal(mine[row, :end], theirs[row, :end]), row


def test_alternating_routings_do_not_rebuild(builds):
    bm = two_adapters()
    x = ids(batch=2, seq=3)
    with torch.no_grad(), bm.routing(["a", "b"]) as one, bm.routing(["b", BASE_ADAPTER]) as two:
        first = (one(input_ids=x).logits, two(input_ids=x).logits)
        n = len(builds)
        for _ in range(2):
            torch.testing.assert_close(one(input_ids=x).logits, first[0], atol=0, rtol=0)
            torch.testing.assert_close(two(input_ids=x).logits, first[1], atol=0, rtol=0)
        assert len(builds) == n


def test_a_changed_layer_drops_its_plan_and_the_next_call_sees_the_change(builds):
    bm = two_adapters()  # "c" is on the first two projections of each block only
    x = ids(batch=3, seq=3)
    with torch.no_grad(), bm.routing(["a", "c", BASE_ADAPTER]) as routed:
        before = routed(input_ids=x).logits
        bm.add_adapter("e", BoneConfig(r=4, target_modules=targets("llama")))  # e.g. a server installs one
        builds.clear()
        torch.testing.assert_close(routed(input_ids=x).logits, before, atol=0, rtol=0)
        assert not builds  # only an adapter no row uses came: every plan still serves
        bm.delete_adapter("c")  # a row's adapter replaced: on every projection now, with other blocks
        bm.add_adapter("c", BoneConfig(r=4, target_modules=targets("llama"), init_weights=False))
        got = routed(input_ids=x).logits
        assert len(builds) == len(bm.bone_layers())  # every layer: a new block, or one it did not have
        torch.testing.assert_close(got[1:2], bm(input_ids=x[1:2], adapter_names=["c"]).logits, atol=1e-5, rtol=1e-5)
        for _, layer in bm.bone_layers():
            layer.bone_block["a"].mul_(0)  # an in-place edit: seen by the block's version, whatever bumped the layer
            layer._refresh(state=False)
        with bm.disable_adapter():
            base = bm(input_ids=x).logits
        torch.testing.assert_close(routed(input_ids=x).logits[:1], base[:1], atol=1e-6, rtol=1e-6)


def test_routing_checks_names_once_and_refuses_use_after_the_block():
    bm = two_adapters()
    with pytest.raises(BoneError, match="unknown adapter 'zzz'"):
        with bm.routing(["a", "zzz"]):
            pass
    with bm.routing(["a"]) as routed:
        pass
    with pytest.raises(BoneError, match="closed"):
        routed(input_ids=ids(batch=1))
    with bm.routing(["a", "b"]) as routed, pytest.raises(BoneError, match="2 entries"):
        routed(input_ids=ids(batch=3))


def test_grad_mode_never_reuses_plans_and_gradients_reach_the_rows_adapters(builds):
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=targets("llama")), "a")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=targets("llama")))
    bm.set_adapter(["a", "b"])
    x = ids(batch=2)
    with bm.routing(["a", "b"]) as routed:
        routed(input_ids=x, labels=x).loss.backward()
        routed(input_ids=x, labels=x)
    assert len(builds) == 2 * len(bm.bone_layers())
    grads = {n.split(".")[-1] for n, p in bm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"a", "b"}


@pytest.mark.parametrize(
    "names", [["a", "a", BASE_ADAPTER, "c", "b"], ["c", "a", "a", "b", "b"], ["b", "a", "b", "c", "a"]]
)
def test_grad_mode_routing_gives_each_row_its_own_adapters_gradient(names):
    """Training with rows of several adapters (co-training, worker/cotrain.py): contiguous rows per adapter take
    the one-add path, scattered ones the index path; both must give each adapter the gradient of its rows alone."""
    bm = two_adapters()
    bm.set_adapter(["a", "b", "c"])
    bm.train()
    x = ids(batch=5, seq=6)
    with bm.routing(names) as routed:
        routed(input_ids=x).logits.float().pow(2).mean(dim=(1, 2)).sum().backward()
    got = {n: p.grad.clone() for n, p in bm.named_parameters() if p.grad is not None}
    bm.zero_grad(set_to_none=True)
    for i, name in enumerate(names):
        if name == BASE_ADAPTER:  # the base row trains nothing
            continue
        with bm.routing([name]) as routed:
            routed(input_ids=x[i : i + 1]).logits.float().pow(2).mean().backward()
    want = {n: p.grad for n, p in bm.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "names",
    [["b", "a"], ["a", "b", "c", BASE_ADAPTER], ["a", "b", "b", "c", "a"], [BASE_ADAPTER, "a", "a", "b"]],
)
def test_cpu_half_precision_plans_widen_and_each_row_equals_it_alone(names):
    """CPU bf16: plans hold fp32 copies of the blocks (bone.routing._CPU_WIDEN); every segment shape (one bmm
    for single-row adapters, in-order or indexed, contiguous multi-row, indexed rows, base rows) gives each row
    what it gets alone, and stays within bf16 tolerance of the fp32 model."""
    ref = two_adapters()
    bm = two_adapters().to(torch.bfloat16)
    x = ids(batch=len(names), seq=5)
    with torch.no_grad(), bm.routing(names) as routed:
        got = routed(input_ids=x).logits.float()
        plans = [layer.row_plan for _, layer in bm.bone_layers() if layer.row_plan is not None]
        assert plans and all(p.widened for p in plans if p.kind is not R.PlanKind.BASE)
        for i, name in enumerate(names):
            alone = bm(input_ids=x[i : i + 1], adapter_names=[name]).logits.float()
            torch.testing.assert_close(got[i : i + 1], alone, atol=2e-2, rtol=2e-2)
        want = ref(input_ids=x, adapter_names=names).logits
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def test_a_block_edited_in_place_is_seen_by_a_plan_holding_its_fp32_copy():
    # bf16 on the CPU: segment plans hold fp32 copies of the blocks (see bone.routing._CPU_WIDEN), so only the
    # block's in-place version tells such a plan it is stale when the layer's bump says "adapters changed"
    bm = two_adapters().to(torch.bfloat16)
    x = ids(batch=4, seq=3)
    names = ["a", "a", "b", "b"]
    with torch.no_grad(), bm.routing(names) as routed:
        routed(input_ids=x)
        for _, layer in bm.bone_layers():
            layer.bone_block["a"].mul_(0)
            layer._refresh(state=False)
        got = routed(input_ids=x).logits
        with bm.disable_adapter():
            base = bm(input_ids=x[:2]).logits
        torch.testing.assert_close(got[:2], base, atol=0, rtol=0)


def test_prepared_plans_are_the_ones_the_forward_uses(builds):
    bm = two_adapters()
    x = ids(batch=3, seq=3)
    names = ["a", "c", BASE_ADAPTER]
    with torch.no_grad():
        want = bm(input_ids=x, adapter_names=names).logits
        builds.clear()
        with bm.routing(names) as routed:
            routed.prepare([layer for _, layer in bm.bone_layers()], rows=3, tokens=3)
            assert len(builds) == len(bm.bone_layers())  # every plan, before any forward
            torch.testing.assert_close(routed(input_ids=x).logits, want, atol=0, rtol=0)
            assert len(builds) == len(bm.bone_layers())  # the forward built none
