import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bone import BoneConfig, BoneConfigError, BoneError, BoneLinear
from bone import functional as BF
from bone import train_path as TP

SHAPES = [(16, 12, 4), (10, 20, 2), (10, 20, 4), (12, 8, 3), (5, 6, 8), (3, 7, 16)]  # (in, out, r); r > in last two


def config(variant, r, random_init=False, mini_r=1):
    """The BoneConfig of one adapter of ``variant`` ("bone" / "bat" / "mini") with rank ``r``."""
    init = {"bone": not random_init, "bat": "bat", "mini": "mini"}[variant]
    return BoneConfig(r=r, init_weights=init, mini_r=mini_r)


def make(fin, fout, conv1d=False, bias=True, seed=0):
    torch.manual_seed(seed)
    if conv1d:
        base = Conv1D(fout, fin)
        nn.init.normal_(base.weight, std=0.2)
        nn.init.normal_(base.bias, std=0.2)
    else:
        base = nn.Linear(fin, fout, bias=bias)
    return BoneLinear(base)


def logical_w(layer):
    w = layer.base_layer.weight
    return w.t() if layer.is_conv1d else w


def rand_(p, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("fin, fout, r", SHAPES)
def test_chunk_sum_and_dense_delta(fin, fout, r):
    x = torch.randn(2, 3, fin)
    pad = -fin % r
    ref = torch.nn.functional.pad(x, (0, pad)).reshape(2, 3, -1, r).sum(-2)
    torch.testing.assert_close(BF.chunk_sum(x, r), ref)
    blk = torch.randn(r, fout)
    d = BF.bone_delta(blk, fin)
    for o in range(fout):
        for c in range(fin):
            assert d[o, c] == blk[c % r, o]


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("fin, fout, r", SHAPES)
@pytest.mark.parametrize("grad", [False, True])
def test_bone_forward_equals_dense(fin, fout, r, conv1d, grad):
    layer = make(fin, fout, conv1d)
    layer.add_adapter("a", config("bone", r, random_init=True))
    layer.set_active(["a"])
    x = torch.randn(4, 5, fin, requires_grad=grad)
    W = logical_w(layer) + BF.bone_delta(layer.bone_block["a"], fin)
    ref = x @ W.t() + layer.base_layer.bias
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def train_path():
    """Pins the Bone training path for one test, then restores the default and forgets measured choices."""
    yield TP.force
    TP.force(None)
    TP.clear()


@pytest.mark.parametrize("mode", ["fold", "add", "measure", None])  # measure: timed at first use
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("fin, fout, r", [(16, 12, 4), (12, 8, 3), (10, 20, 4), (5, 6, 8), (40, 24, 16)])
def test_training_path_gradients(fin, fout, r, conv1d, mode, train_path):
    """The training Function (both forms of each half) gives the output and gradients of autograd on W + ΔW,
    with two adapters of different r (one with in % r != 0)."""
    train_path(mode)
    layer = make(fin, fout, conv1d)
    layer.add_adapter("a", config("bone", r, random_init=True))
    layer.add_adapter("b", config("bone", r + 1, random_init=True))
    layer.set_active(["a", "b"])
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 32, fin, requires_grad=True)
    assert layer._trainable(x, [layer.bone_block["a"]])
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    got = [
        t.grad.clone()
        for t in (x, layer.base_layer.weight, layer.base_layer.bias, layer.bone_block["a"], layer.bone_block["b"])
    ]
    leaves = [
        t.detach().clone().requires_grad_(True)
        for t in (x, layer.base_layer.weight, layer.base_layer.bias, layer.bone_block["a"], layer.bone_block["b"])
    ]
    xl, wl, bl, al, bbl = leaves
    W = (wl.t() if conv1d else wl) + BF.bone_delta(al, fin) + BF.bone_delta(bbl, fin)
    ref = xl @ W.t() + bl
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    ref.backward(gy)
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g, leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fold", "add"])
def test_sibling_projections_share_the_chunk_sum_in_training(mode, train_path):
    """q/k/v-like layers reading the same x compute S_r(x) once; gradients still equal the reference."""
    train_path(mode)
    layers = [make(18, 8, seed=i) for i in range(3)]  # 18 % 4 != 0: every miss goes through chunk_sum
    for layer in layers:
        layer.add_adapter("a", config("bone", 4, random_init=True))
        layer.set_active(["a"])
    x = torch.randn(24, 18, requires_grad=True)
    calls = []
    real = BF.chunk_sum
    BF.chunk_sum = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        ys = [layer(x) for layer in layers]
    finally:
        BF.chunk_sum = real
    assert len(calls) == 1  # the first layer computes it, the siblings reuse it
    sum(y.square().sum() for y in ys).backward()
    xl = x.detach().clone().requires_grad_(True)
    ref = sum(
        (xl @ (layer.base_layer.weight + BF.bone_delta(layer.bone_block["a"], 18)).t() + layer.base_layer.bias)
        .square()
        .sum()
        for layer in layers
    )
    ref.backward()
    torch.testing.assert_close(x.grad, xl.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fold", "add"])
def test_training_path_bf16_base_fp32_blocks(mode, train_path):
    """A bf16 base with fp32 blocks (PEFT's autocast_adapter_dtype) runs the additive form without
    converting x; output stays bf16, block gradients fp32 and close to an fp32 reference."""
    train_path(mode)
    torch.manual_seed(0)
    layer = BoneLinear(nn.Linear(24, 16)).to(torch.bfloat16)
    layer.add_adapter("a", config("bone", 5, random_init=True), dtype=torch.float32)
    layer.set_active(["a"])
    x = torch.randn(40, 24, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    gy = torch.randn_like(y)
    y.backward(gy)
    blk = layer.bone_block["a"]
    assert blk.grad.dtype == torch.float32
    bl = blk.detach().clone().requires_grad_(True)
    ref = (
        x.detach().float() @ (layer.base_layer.weight.float() + BF.bone_delta(bl, 24)).t()
        + layer.base_layer.bias.float()
    )
    ref.backward(gy.float())
    torch.testing.assert_close(blk.grad, bl.grad, atol=0.05, rtol=0.02)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("fin, fout, r", [(16, 12, 4), (12, 8, 2), (32, 64, 16), (24, 24, 8)])
def test_bat_training_gradients(fin, fout, r):
    """Bat's training Function: output and gradients (x, W, bias, block) equal autograd on the dense W'."""
    layer = make(fin, fout)
    layer.add_adapter("a", config("bat", r))
    layer.set_active(["a"])
    rand_(layer.bone_block["a"], 0.1)
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 10, fin, requires_grad=True)
    assert layer._bat_trainable(x, "a")
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    ts = (x, layer.base_layer.weight, layer.base_layer.bias, layer.bone_block["a"])
    got = [t.grad.clone() for t in ts]
    xl, wl, bl, kl = [t.detach().clone().requires_grad_(True) for t in ts]
    wb = wl.reshape(fout // r, r, fin // r, r).permute(0, 2, 1, 3)  # (i, j, r, r) blocks W_ij
    eye = torch.eye(r)
    wp = (wb @ (eye + kl[:, None]) + kl[:, None]).permute(0, 2, 1, 3).reshape(fout, fin)
    ref = xl @ wp.t() + bl
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    ref.backward(gy)
    for g, leaf in zip(got, (xl, wl, bl, kl)):
        torch.testing.assert_close(g, leaf.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_bat_forward_formula(conv1d):
    fin, fout, r = 12, 8, 4
    layer = make(fin, fout, conv1d)
    layer.add_adapter("a", config("bat", r))
    rand_(layer.bone_block["a"], 0.1)
    layer.set_active(["a"])
    W = logical_w(layer).detach()
    B = layer.bone_block["a"].detach()
    ref_w = W.clone()
    eye = torch.eye(r)
    for i in range(fout // r):
        for j in range(fin // r):
            blk = W[i * r : (i + 1) * r, j * r : (j + 1) * r]
            ref_w[i * r : (i + 1) * r, j * r : (j + 1) * r] = blk @ (eye + B[i]) + B[i]
    x = torch.randn(3, fin)
    torch.testing.assert_close(layer(x), x @ ref_w.t() + layer.base_layer.bias, atol=1e-5, rtol=1e-5)


def test_bat_divisibility_error_names_shape():
    layer = make(10, 20)
    with pytest.raises(BoneConfigError, match=r"in_features=10, out_features=20"):
        layer.add_adapter("a", config("bat", 4))


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize(
    "variants",
    [("bone",), ("bat",), ("mini",), ("bone", "bat"), ("bat", "bone"), ("bat", "bat"), ("bone", "mini", "bat")],
)
def test_merge_unmerge_random_blocks(variants, conv1d):
    fin, fout, r = 16, 12, 4
    layer = make(fin, fout, conv1d)
    names = [f"a{i}" for i in range(len(variants))]
    for i, (n, v) in enumerate(zip(names, variants)):
        layer.add_adapter(n, config(v, r, mini_r=3))
        rand_(layer.bone_block[n], 0.1, seed=i + 1)
    layer.set_active(names)
    x = torch.randn(5, fin)
    with torch.no_grad():
        unmerged = layer(x)
        w0 = layer.base_layer.weight.detach().clone()
        layer.merge()
        assert layer.merged_adapters == names
        merged = layer(x)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.base_layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["bone", "bat", "mini"])
def test_half_precision_merge_keeps_shapes(dtype, variant):
    layer = make(16, 12)
    layer.to(dtype)
    layer.add_adapter("a", config(variant, 4, mini_r=3), dtype=dtype)
    rand_(layer.bone_block["a"], 0.05)
    layer.set_active(["a"])
    shape = tuple(layer.bone_block["a"].shape)
    layer.merge()
    layer.unmerge()
    assert tuple(layer.bone_block["a"].shape) == shape and layer.bone_block["a"].dtype == dtype
    assert layer.base_layer.weight.dtype == dtype


def test_output_in_input_dtype_adapter_in_fp32():
    layer = make(16, 12).to(torch.bfloat16)
    layer.add_adapter("a", config("bone", 4, random_init=True), dtype=torch.float32)
    layer.add_adapter("b", config("bat", 4), dtype=torch.float32)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    for active in (["a"], ["b"], ["a", "b"]):
        layer.set_active(active)
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("fin", [5, 10])  # 5: r > in; 10: in % r != 0
def test_safe_merge_never_touches_base_on_failure(fin):
    layer = make(fin, 6)
    layer.add_adapter("a", config("bone", 8))
    with torch.no_grad():
        layer.bone_block["a"][0, 0] = float("nan")
    layer.set_active(["a"])
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(BoneError, match="'a'"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and layer.merged_adapters == []


def test_r_greater_than_in_merges():
    layer = make(5, 6)
    layer.add_adapter("a", config("bone", 8, random_init=True))
    layer.set_active(["a"])
    x = torch.randn(3, 5)
    with torch.no_grad():
        y = layer(x)
        layer.merge(safe_merge=True)
        torch.testing.assert_close(layer(x), y)


def test_zero_init_is_identity_and_disabled():
    layer = make(16, 12)
    for n, v in (("a", "bone"), ("b", "bat"), ("c", "mini")):
        layer.add_adapter(n, config(v, 4))
    x = torch.randn(3, 16)
    base = layer.base_layer(x)
    for act in (["a"], ["b"], ["c"], ["a", "b", "c"]):
        layer.set_active(act)
        assert torch.equal(layer(x), base) if act == ["a"] else torch.allclose(layer(x), base, atol=1e-6)
    layer.set_disabled(True)
    assert torch.equal(layer(x), base)


def test_wraps_only_linear_and_conv1d():
    with pytest.raises(BoneConfigError, match="Embedding"):
        BoneLinear(nn.Embedding(4, 4))


def test_fast_path_refreshes_after_to_and_load_state_dict():
    layer = make(16, 12)
    layer.add_adapter("a", config("bone", 4, random_init=True))
    layer.set_active(["a"])
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        y = layer(x)
        sd = {k: v.clone() * 2 for k, v in layer.state_dict().items()}
        layer.load_state_dict(sd, assign=True)
        W = layer.base_layer.weight + BF.bone_delta(layer.bone_block["a"], 16)
        torch.testing.assert_close(layer(x), x @ W.t() + layer.base_layer.bias)
        layer.double()
        assert layer(x.double()).dtype == torch.float64
    assert not torch.equal(y, layer(x.double()).float())


def test_cpu_training_takes_one_path_by_default(train_path):
    """On the CPU the default is a fixed rule on the token count with no timing: every process (the one that
    wrote a checkpoint and the one that resumes it) computes with the same rounding, so resumes stay
    bit-identical. Additive up to 1024 tokens, folded from there."""
    train_path(None)
    layer = make(16, 12, False)
    layer.add_adapter("a", config("bone", 4, random_init=True))
    layer.set_active(["a"])
    x = torch.randn(2, 3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert TP.choose(16, 12, (4,), 6, torch.float32, torch.device("cpu"), False) == (False, False)
    assert TP.choose(16, 12, (4,), 1024, torch.float32, torch.device("cpu"), False) == (False, False)
    assert TP.choose(16, 12, (4,), 1025, torch.float32, torch.device("cpu"), False) == (True, True)
    x = torch.randn(2, 1025, 16, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "BoneTrainFnBackward"  # not the lean additive Function
    y.sum().backward()
    assert TP.choices() == {}  # nothing was timed


@pytest.mark.parametrize("mode", ["add", None])
@pytest.mark.parametrize("bias", [False, True])
def test_lean_training_path_is_bit_identical_to_the_generic_one(mode, bias, train_path):
    """The common training case (one Bone adapter on a frozen nn.Linear, r dividing in, additive on the CPU)
    takes the lean Function; it gives exactly the generic Function's output and gradients, and both match
    autograd on W + ΔW."""
    train_path(mode)
    layer = make(48, 20, bias=bias)
    layer.add_adapter("a", config("bone", 16, random_init=True))
    layer.set_active(["a"])
    layer.requires_grad_(False)
    blk = layer.bone_block["a"].requires_grad_(True)
    x = torch.randn(2, 7, 48, requires_grad=True)
    gy = torch.randn(2, 7, 20)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "BoneAddFnBackward"
    y.backward(gy)
    got = (y.detach(), x.grad.clone(), blk.grad.clone())
    x2 = x.detach().clone().requires_grad_(True)
    blk2 = blk.detach().clone().requires_grad_(True)
    y2 = TP.BoneTrainFn.apply(x2, layer.base_layer.weight, layer.base_layer.bias, False, False, False, blk2)
    y2.backward(gy)
    for a, b in zip(got, (y2.detach(), x2.grad, blk2.grad)):
        assert torch.equal(a, b)
    x3 = x.detach().clone().requires_grad_(True)
    blk3 = blk.detach().clone().requires_grad_(True)
    W = layer.base_layer.weight + BF.bone_delta(blk3, 48)
    y3 = x3 @ W.t() + (layer.base_layer.bias if bias else 0)
    y3.backward(gy)
    for a, b in zip(got, (y3.detach(), x3.grad, blk3.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("why", ["fold", "weight grad", "r does not divide in"])
def test_training_leaves_the_lean_path_when_it_does_not_apply(why, train_path):
    train_path("fold" if why == "fold" else None)
    fin = 50 if why == "r does not divide in" else 48
    layer = make(fin, 20)
    layer.add_adapter("a", config("bone", 16, random_init=True))
    layer.set_active(["a"])
    layer.base_layer.weight.requires_grad_(why == "weight grad")
    y = layer(torch.randn(3, fin, requires_grad=True))
    assert type(y.grad_fn).__name__ == "BoneTrainFnBackward"
