import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bone import BoneCheckpointError, BoneConfig, BoneConfigError, BoneModel, get_bone_model
from tests.bone.tiny import build, ids, randomize, targets


def logits(m, x, **kw):
    with torch.no_grad():
        return m(input_ids=x, **kw).logits


CASES = [("llama", True), ("llama", "bat"), ("opt", False), ("gpt2", True), ("gpt2", "bat"), ("llama-odd", False)]


@pytest.mark.parametrize("fmt", ["bone", "miss"])
@pytest.mark.parametrize("name, init", CASES)
def test_save_load_reproduces_logits(name, init, fmt, tmp_path):
    bm = get_bone_model(build(name), BoneConfig(r=8, target_modules=targets(name), init_weights=init))
    randomize(bm, 0.05)
    x = ids()
    ref = logits(bm, x)
    bm.save_pretrained(tmp_path, format=fmt)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == fmt.upper() and cfg["inference_mode"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and k.endswith(f".{fmt}_block") for k in keys)
    loaded = BoneModel.from_pretrained(build(name), tmp_path)
    torch.testing.assert_close(logits(loaded, x), ref, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = BoneModel.from_pretrained(build(name), tmp_path, is_trainable=True)
    assert all(".bone_block.default" in n for n, p in trainable.named_parameters() if p.requires_grad)


def test_saved_keys_layout_and_no_leak(tmp_path):
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    bm.add_adapter("b", BoneConfig(r=8, target_modules=["q_proj"], init_weights="bat"))
    bm.save_pretrained(tmp_path / "a")
    bm.save_pretrained(tmp_path / "b", adapter_name="b")
    ka = load_file(tmp_path / "a" / "adapter_model.safetensors")
    kb = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(ka) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}.bone_block" for i in (0, 1) for p in ("q_proj", "v_proj")
    )
    assert ka["base_model.model.model.layers.0.self_attn.q_proj.bone_block"].shape == (4, 32)
    assert sorted(kb) == [f"base_model.model.model.layers.{i}.self_attn.q_proj.bone_block" for i in (0, 1)]
    assert kb["base_model.model.model.layers.0.self_attn.q_proj.bone_block"].shape == (4, 8, 8)
    assert bm.get_adapter_state_dict("b").keys() == kb.keys()
    bm.set_adapter(["a", "b"])
    with pytest.raises(Exception, match="adapter_name"):
        bm.save_pretrained(tmp_path / "c")


def test_trained_biases_and_modules_to_save_are_saved(tmp_path):
    cfg = BoneConfig(r=4, target_modules=["q_proj", "fc1"], bias="bone_only", modules_to_save=["lm_head"])
    bm = get_bone_model(build("opt"), cfg)
    randomize(bm, 0.05)
    with torch.no_grad():
        for n, p in bm.named_parameters():
            if p.requires_grad and not n.endswith("bone_block.default"):
                p.add_(0.25)  # as if trained
    x = ids()
    ref = logits(bm, x)
    bm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert "base_model.model.model.decoder.layers.1.fc1.base_layer.bias" in keys
    assert "base_model.model.lm_head.weight" in keys
    loaded = BoneModel.from_pretrained(build("opt"), tmp_path)
    torch.testing.assert_close(logits(loaded, x), ref, atol=1e-6, rtol=1e-6)


def test_mini_variant_only_in_miss_format(tmp_path):
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=["q_proj"], init_weights="mini", mini_r=8))
    randomize(bm, 0.1)
    with pytest.raises(BoneConfigError, match="init_weights"):
        bm.save_pretrained(tmp_path)
    bm.export_miss(tmp_path)
    x = ids()
    torch.testing.assert_close(logits(BoneModel.from_pretrained(build("llama"), tmp_path), x), logits(bm, x))


def _saved(tmp_path, **cfg):
    bm = get_bone_model(build("llama"), BoneConfig(r=4, **cfg))
    bm.save_pretrained(tmp_path)
    return load_file(tmp_path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (
            lambda t: t.pop("base_model.model.model.layers.1.self_attn.q_proj.bone_block"),
            r"missing key .*layers\.1\.self_attn\.q_proj\.bone_block.*'model\.layers\.1\.self_attn\.q_proj'.*\(4, 32\)",
        ),
        (
            lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.bone_block", torch.zeros(4, 48)),
            r"unexpected key .*'model\.layers\.0\.mlp\.up_proj'",
        ),
        (
            lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.bone_block", torch.zeros(8, 32)),
            r"module 'model\.layers\.0\.self_attn\.q_proj'.*shape \(8, 32\), expected \(4, 32\)",
        ),
        (
            lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.miss_block", torch.zeros(4, 32)),
            "both a bone_block and a miss_block",
        ),
        (
            lambda t: t.__setitem__(
                "base_model.model.model.layers.0.self_attn.q_proj.bone_block", torch.zeros(4, 32, dtype=torch.int32)
            ),
            "floating-point",
        ),
    ],
)
def test_load_errors_name_module_and_shapes(mutate, match, tmp_path):
    tensors = _saved(tmp_path, target_modules=["q_proj"])
    mutate(tensors)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = build("llama")
    with pytest.raises(BoneCheckpointError, match=match):
        BoneModel.from_pretrained(model, tmp_path)
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=["k_proj"]), "x")
    with pytest.raises(BoneCheckpointError, match=match):
        bm.load_adapter(tmp_path, "y")
    assert list(bm.adapter_configs) == ["x"]  # a failed load leaves the model unchanged
    assert not any(".y" in n[-2:] for n, _ in bm.named_parameters())


def test_add_adapter_from_state_dict_matches_load_adapter(tmp_path):
    src = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=targets("llama"), init_weights=False))
    src.save_pretrained(tmp_path)
    x = ids()
    bm = get_bone_model(build("llama"), BoneConfig(r=2, target_modules=["q_proj"]), "other")
    cfg = BoneConfig.from_pretrained(tmp_path)
    bm.add_adapter_from_state_dict("t", cfg, load_file(tmp_path / "adapter_model.safetensors"))
    bm.load_adapter(tmp_path, "u")
    assert bm.active_adapters == ["other"]  # loading does not activate
    ref = logits(src, x)
    for n in ("t", "u"):
        bm.set_adapter(n)
        torch.testing.assert_close(logits(bm, x), ref)
    torch.testing.assert_close(logits(bm, x, adapter_names=["t", "u", "__base__"])[:2], ref[:2])


def test_pickle_checkpoints_are_refused(tmp_path):
    BoneConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(BoneCheckpointError, match="refused"):
        BoneModel.from_pretrained(build("llama"), tmp_path)
    with pytest.raises(BoneCheckpointError, match="does not exist"):
        BoneModel.from_pretrained(build("llama"), tmp_path / "nope")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(BoneCheckpointError, match="cannot read"):
        BoneModel.from_pretrained(build("llama"), tmp_path)


# -- golden vectors written by PEFT 0.18.1 -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama-bone-r8", "llama-bat-r8"])
def test_golden_vectors(case, golden_dir):
    from transformers import AutoModelForCausalLM

    g = golden_dir / case
    exp = load_file(g / "expected.safetensors")
    x = exp["input_ids"]
    bm = BoneModel.from_pretrained(AutoModelForCausalLM.from_pretrained(g / "base"), g / "adapter")
    torch.testing.assert_close(logits(bm, x), exp["adapter_logits"], atol=1e-5, rtol=0)
    with bm.disable_adapter():
        disabled = logits(bm, x)
    # Disabled is the base model itself, bit for bit; against PEFT's file, only as close as the transformers
    # build that wrote it (the plain model of transformers 5.25 differs from it by 1.5e-7)
    assert torch.equal(disabled, logits(AutoModelForCausalLM.from_pretrained(g / "base"), x))
    torch.testing.assert_close(disabled, exp["base_logits"], atol=1e-6, rtol=0)
    rows = logits(bm, x, adapter_names=["default", "__base__"])
    torch.testing.assert_close(rows[0], exp["adapter_logits"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[1], exp["base_logits"][1], atol=1e-5, rtol=0)
    with torch.enable_grad():  # the folded training path gives the same logits
        bm.base_model.model.layers[0].self_attn.q_proj.bone_block["default"].requires_grad_(True)
        torch.testing.assert_close(bm(input_ids=x).logits.detach(), exp["adapter_logits"], atol=1e-5, rtol=0)
    plain = bm.merge_and_unload()
    torch.testing.assert_close(logits(plain, x), exp["merged_logits"], atol=1e-5, rtol=0)


# -- PEFT 0.18.1 interoperability ----------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore")  # PEFT's Bone deprecation warning and friends
@pytest.mark.parametrize("fmt", ["bone", "miss"])
@pytest.mark.parametrize("init", [True, "bat"])
def test_peft_loads_our_checkpoint(fmt, init, tmp_path):
    peft = pytest.importorskip("peft")
    bm = get_bone_model(build("llama"), BoneConfig(r=8, target_modules=targets("llama"), init_weights=init))
    randomize(bm, 0.05)
    x = ids()
    ref = logits(bm, x)
    bm.save_pretrained(tmp_path, format=fmt)
    pm = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    assert pm.peft_config["default"].peft_type.value == fmt.upper()
    torch.testing.assert_close(logits(pm, x), ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("init", [False, "bat", "mini"])
def test_we_load_peft_miss_checkpoints(init, tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.MissConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=init, mini_r=4)
    pm = peft.get_peft_model(build("llama"), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "miss_block" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = ids()
    ref = logits(pm, x)
    pm.save_pretrained(tmp_path)
    bm = BoneModel.from_pretrained(build("llama"), tmp_path)
    assert bm.adapter_configs["default"].peft_type == "MISS"
    torch.testing.assert_close(logits(bm, x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_tensor(bad):
    from bone.adapter_files import NonFiniteTensorError, check_finite

    tensors = {"a.bone_block": torch.zeros(2, 3), "b.bone_block": torch.ones(2, 3), "steps": torch.tensor([1, 2])}
    check_finite(tensors)
    tensors["b.bone_block"][1, 2] = bad
    with pytest.raises(NonFiniteTensorError, match="'b.bone_block' holds 1 non-finite") as refused:
        check_finite(tensors)
    assert refused.value.key == "b.bone_block"
