import json

import pytest
import torch

from bone import (
    BASE_ADAPTER,
    DEFAULT_TARGETS,
    BoneConfig,
    BoneConfigError,
    BoneError,
    BoneLinear,
    BoneModel,
    get_bone_model,
    validate_config_for_model,
)
from tests.bone.tiny import MODELS, build, ids, randomize, targets


def logits(m, x, **kw):
    with torch.no_grad():
        return m(input_ids=x, **kw).logits


CASES = [(name, init) for name in MODELS for init in (True, "bat") if not (name == "llama-odd" and init == "bat")]


@pytest.mark.parametrize("name, init", CASES)
def test_zero_init_equals_base_exactly(name, init):
    base = build(name)
    x = ids()
    ref = logits(base, x)
    bm = get_bone_model(build(name), BoneConfig(r=8, target_modules=targets(name), init_weights=init))
    out = logits(bm, x)
    assert torch.equal(out, ref) if init is True else torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(bm(input_ids=x).logits, ref, atol=1e-6)  # grad enabled: the folded training path


def test_seed_example_opt():
    cfg = BoneConfig(target_modules=["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"], r=8, init_weights=True)
    bm = get_bone_model(build("opt"), cfg, adapter_name="default")
    wrapped = [n for n, m in bm.base_model.named_modules() if isinstance(m, BoneLinear)]
    assert len(wrapped) == 2 * 6
    t, total = bm.get_nb_trainable_parameters()
    assert t == 2 * 8 * (32 * 4 + 48 + 32)
    assert all(".bone_block." in n for n, p in bm.named_parameters() if p.requires_grad)
    bm.print_trainable_parameters()


@pytest.mark.parametrize("name, init", CASES)
def test_gradients_reach_only_trainable(name, init):
    bm = get_bone_model(build(name), BoneConfig(r=8, target_modules=targets(name), init_weights=init))
    randomize(bm, 0.02)
    bm.train()
    x = ids()
    bm(input_ids=x, labels=x).loss.backward()
    for n, p in bm.named_parameters():
        if p.requires_grad:
            assert ".bone_block.default" in n
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize(
    "name, targets_", [("llama", {"q_proj", "v_proj"}), ("opt", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"})]
)
def test_default_targets(name, targets_):
    bm = get_bone_model(build(name), BoneConfig(r=4))
    leaves = {n.split(".")[-1] for n, m in bm.base_model.named_modules() if isinstance(m, BoneLinear)}
    assert leaves == targets_
    for arch in ("llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "bloom", "phi"):
        assert DEFAULT_TARGETS[arch]


def wrapped_names(bm):
    return sorted(n for n, m in bm.base_model.named_modules() if isinstance(m, BoneLinear))


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (
            dict(target_modules=r".*\.0\.self_attn\.(q|k)_proj"),
            ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"],
        ),
        (dict(target_modules=["q_proj"], layers_to_transform=[1]), ["model.layers.1.self_attn.q_proj"]),
        (
            dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
            ["model.layers.1.self_attn.q_proj"],
        ),
        (
            dict(target_modules=["self_attn.q_proj", "down_proj"], exclude_modules=["layers.0.mlp.down_proj"]),
            ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"],
        ),
        (
            dict(target_modules="all-linear", exclude_modules=r".*mlp.*"),
            [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "o_proj", "q_proj", "v_proj")],
        ),
    ],
)
def test_target_matching(cfg, expected):
    bm = get_bone_model(build("llama"), BoneConfig(r=4, **cfg))
    assert wrapped_names(bm) == expected


def test_all_linear_skips_lm_head():
    bm = get_bone_model(build("gpt2"), BoneConfig(r=4, target_modules="all-linear"))
    names = wrapped_names(bm)
    assert len(names) == 8 and not any("lm_head" in n for n in names)


def test_no_match_error_lists_linear_names():
    model = build("llama")
    with pytest.raises(BoneConfigError, match=r"matched no module.*q_proj.*v_proj") as ei:
        get_bone_model(model, BoneConfig(r=4, target_modules=["query"]))
    assert ei.value.field == "target_modules"
    assert not any(isinstance(m, BoneLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen either


@pytest.mark.parametrize(
    "cfg, match",
    [
        (dict(target_modules=["embed_tokens"]), "Embedding"),
        (dict(target_modules=None), "no default targets"),
    ],
)
def test_unsupported_targets(cfg, match):
    model = build("llama")
    if cfg["target_modules"] is None:
        model.config.model_type = "unknown-arch"
    with pytest.raises(BoneConfigError, match=match):
        get_bone_model(model, BoneConfig(r=4, **cfg))


def test_validate_config_for_model_on_meta_device():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(build("llama-odd").config)
    before = [n for n, _ in model.named_modules()]
    validate_config_for_model(model, BoneConfig(r=8, target_modules=["q_proj"]))
    with pytest.raises(
        BoneConfigError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*in_features=36, out_features=36"
    ):
        validate_config_for_model(model, BoneConfig(r=8, target_modules=["q_proj"], init_weights="bat"))
    with pytest.raises(BoneConfigError, match="matched no module"):
        validate_config_for_model(model, BoneConfig(r=8, target_modules=["nope"]))
    cfg = BoneConfig(r=8, target_modules=["q_proj"])
    cfg.r = 0  # mutated after construction
    with pytest.raises(BoneConfigError, match="`r`"):
        validate_config_for_model(model, cfg)
    assert [n for n, _ in model.named_modules()] == before


def test_bat_divisibility_error_in_get_bone_model():
    with pytest.raises(BoneConfigError, match=r"down_proj.*in_features=50"):
        get_bone_model(build("llama-odd"), BoneConfig(r=4, target_modules=["down_proj"], init_weights="bat"))


def _multi(name="llama"):
    bm = get_bone_model(build(name), BoneConfig(r=8, target_modules=targets(name), init_weights=False), "a")
    bm.add_adapter("b", BoneConfig(r=8, target_modules=targets(name)[:3], init_weights="bat"))
    bm.add_adapter("c", BoneConfig(r=4, target_modules=targets(name)[-2:], init_weights=False))
    randomize(bm, 0.05)
    return bm


def test_adding_and_deleting_inactive_adapters_keeps_every_requires_grad_flag():
    bm = _multi()  # "a" active and trainable; "b" and "c" inactive

    def flags():
        return {n: p.requires_grad for n, p in bm.named_parameters()}

    config = BoneConfig(r=8, target_modules=targets("llama"), init_weights=False)
    bm.add_adapter_from_state_dict("d", config, {k: v.clone() for k, v in bm.get_adapter_state_dict("a").items()})
    bm.delete_adapter("c")
    now = flags()
    bm._update_requires_grad()  # the full recomputation must find nothing to change
    assert now == flags() and any(now.values())
    assert not any(flag for n, flag in now.items() if n.endswith(".d"))


def test_multi_adapter_management():
    bm = _multi()
    x = ids()
    base = logits(build("llama"), x)
    assert bm.active_adapters == ["a"]
    assert {n.split(".")[-1] for n, p in bm.named_parameters() if p.requires_grad} == {"a"}
    la = logits(bm, x)
    bm.set_adapter("b")
    assert {n.split(".")[-1] for n, p in bm.named_parameters() if p.requires_grad} == {"b"}
    lb = logits(bm, x)
    assert not torch.allclose(la, lb)
    with bm.disable_adapter():
        assert torch.equal(logits(bm, x), base)
        assert not any(p.requires_grad for p in bm.parameters())
    assert torch.equal(logits(bm, x), lb)
    # Bone and Bat on the same layer, both active (PEFT crashes here): Bat applies to W + ΔW_a
    bm.set_adapter(["a", "b"])
    lab = logits(bm, x)
    bm.merge_adapter()
    torch.testing.assert_close(logits(bm, x), lab, atol=1e-5, rtol=1e-5)
    with pytest.raises(BoneError, match="merged"):
        bm.delete_adapter("a")
    with pytest.raises(BoneError, match="unmerge"):
        bm(input_ids=x, adapter_names=["a", "b", "c"])
    bm.unmerge_adapter()
    torch.testing.assert_close(logits(bm, x), lab, atol=1e-5, rtol=1e-5)
    bm.delete_adapter("a")
    assert bm.active_adapters == ["b"] and "a" not in bm.adapter_configs
    assert not any(".a" in n[-2:] for n, _ in bm.named_parameters())
    torch.testing.assert_close(logits(bm, x), lb, atol=1e-6, rtol=1e-6)
    with pytest.raises(BoneError, match="unknown adapter"):
        bm.set_adapter("a")
    with pytest.raises(BoneConfigError, match="already exists"):
        bm.add_adapter("b", BoneConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(BoneConfigError, match="adapter name"):
        bm.add_adapter(BASE_ADAPTER, BoneConfig(r=2, target_modules=["q_proj"]))
    bm.delete_adapter("b")
    bm.delete_adapter("c")
    assert not any(isinstance(m, BoneLinear) for m in bm.modules())  # unused layers are unwrapped
    torch.testing.assert_close(logits(bm, x), base, atol=1e-5, rtol=1e-5)  # merge/unmerge rounding only


@pytest.mark.parametrize("name, init", CASES)
def test_merge_and_unload(name, init):
    bm = get_bone_model(build(name), BoneConfig(r=8, target_modules=targets(name), init_weights=init))
    randomize(bm, 0.05)
    x = ids()
    ref = logits(bm, x)
    plain = bm.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, BoneLinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, init", CASES)
def test_unmerge_restores_base_weights(name, init):
    model = build(name)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    bm = get_bone_model(model, BoneConfig(r=8, target_modules=targets(name), init_weights=init))
    randomize(bm, 0.05)
    bm.merge_adapter()
    bm.unmerge_adapter()
    plain = bm.unload()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, w0[k], atol=1e-5, rtol=1e-5)


ROW_MODELS = ["llama", "gpt2", "llama-odd"]


@pytest.mark.parametrize("name", ROW_MODELS)
def test_per_row_equals_single_rows(name):
    bm = get_bone_model(build(name), BoneConfig(r=4, target_modules=targets(name), init_weights=False), "a")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=targets(name)[:2], init_weights=False))
    bm.add_adapter("c", BoneConfig(r=2, target_modules=targets(name), init_weights=False))
    if name != "llama-odd":
        bm.add_adapter("d", BoneConfig(r=4, target_modules=targets(name), init_weights="bat"))
    randomize(bm, 0.05)
    names = ["a", BASE_ADAPTER, "b", "c", "a"] + (["d"] if name != "llama-odd" else [])
    x = ids(batch=len(names), seq=6)
    batched = logits(bm, x, adapter_names=names)
    for i, n in enumerate(names):
        if n == BASE_ADAPTER:
            with bm.disable_adapter():
                single = logits(bm, x[i : i + 1])
        else:
            bm.set_adapter(n)
            single = logits(bm, x[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)
    # uniform batch takes the single-adapter route
    torch.testing.assert_close(
        logits(bm, x[:2], adapter_names=["c", "c"]), (bm.set_adapter("c"), logits(bm, x[:2]))[1], atol=1e-5, rtol=1e-5
    )


def test_per_row_with_grad_reaches_the_row_adapters():
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=targets("llama")), "a")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=targets("llama")))
    bm.set_adapter(["a", "b"])
    x = ids(batch=2)
    bm(input_ids=x, labels=x, adapter_names=["a", "b"]).loss.backward()
    grads = {n.split(".")[-1] for n, p in bm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"a", "b"}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_per_row_equals_single(name):
    bm = get_bone_model(build(name), BoneConfig(r=4, target_modules=targets(name), init_weights=False), "a")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=targets(name), init_weights="bat"))
    randomize(bm, 0.3)
    names = ["a", "b", BASE_ADAPTER]
    x = ids(batch=3, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = bm.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=names, **kw)
    for i, n in enumerate(names):
        row = x[i : i + 1]
        if n == BASE_ADAPTER:
            with bm.disable_adapter():
                single = bm.generate(input_ids=row, attention_mask=torch.ones_like(row), **kw)
        else:
            bm.set_adapter(n)
            single = bm.generate(input_ids=row, attention_mask=torch.ones_like(row), **kw)
        assert torch.equal(out[i : i + 1], single), n
    # beams expand each row in place; names follow their row
    out2 = bm.generate(
        input_ids=x[:2], attention_mask=torch.ones_like(x[:2]), adapter_names=["a", "b"], num_beams=2, **kw
    )
    assert out2.shape[0] == 2


@pytest.mark.parametrize(
    "names, match",
    [(["a"], "1 entries for a batch of 2"), (["a", "zzz"], "unknown adapter 'zzz'"), ("a", "list")],
)
def test_per_row_errors(names, match):
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=["q_proj"]), "a")
    with pytest.raises(BoneError, match=match):
        bm(input_ids=ids(batch=2), adapter_names=names)
    with bm.disable_adapter(), pytest.raises(BoneError, match="disable_adapter"):
        bm(input_ids=ids(batch=1), adapter_names=["a"])


def test_modules_to_save_and_bias():
    x = ids()
    cfg = BoneConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], bias="all")
    model = build("opt")
    bm = get_bone_model(model, cfg, "a")
    trainable = {n for n, p in bm.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save.a" in n for n in trainable)
    assert any(n.endswith("q_proj.base_layer.bias") for n in trainable)
    assert any(n.endswith("fc1.bias") for n in trainable)
    assert not any("original_module" in n for n in trainable)
    with pytest.raises(BoneConfigError, match="bias"):
        bm.add_adapter("b", BoneConfig(r=4, target_modules=["q_proj"], bias="bone_only"))
    bm.add_adapter("b", BoneConfig(r=4, target_modules=["k_proj"]))
    with torch.no_grad():
        bm.base_model.lm_head.modules_to_save["a"].weight.add_(0.5)
    la = logits(bm, x)
    with bm.disable_adapter():
        base = logits(bm, x)
    assert not torch.allclose(la, base)
    batched = logits(bm, x, adapter_names=["a", BASE_ADAPTER, "b"])
    torch.testing.assert_close(batched[0:1], la[0:1])
    torch.testing.assert_close(batched[1:2], base[1:2])
    plain = bm.merge_and_unload()
    torch.testing.assert_close(logits(plain, x), la, atol=1e-5, rtol=1e-5)


def test_from_pretrained_is_a_classmethod_and_getattr_falls_through():
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=["q_proj"]))
    assert bm.config.model_type == "llama" and bm.active_adapter == "default"
    assert isinstance(bm, torch.nn.Module) and isinstance(bm, BoneModel)
    with pytest.raises(BoneError, match="already a BoneModel"):
        get_bone_model(bm, BoneConfig(r=4, target_modules=["q_proj"]))


def test_generate_builds_row_plans_once(monkeypatch):
    from bone import routing

    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=targets("llama"), init_weights=False), "a")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=targets("llama"), init_weights=False))
    calls = []
    orig = routing.RowPlan.build.__func__
    monkeypatch.setattr(routing.RowPlan, "build", classmethod(lambda cls, *a: calls.append(1) or orig(cls, *a)))
    x = ids(batch=2, seq=4)
    bm.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        adapter_names=["a", "b"],
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )
    assert len(calls) == 2 * 7  # one plan per wrapped layer for the whole generate call, not per token


def test_per_row_under_inference_mode_equals_no_grad():
    # inference tensors have no version counter: the shared chunk-sum cache must not trip over them
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=targets("llama"), init_weights=False), "a")
    bm.add_adapter("b", BoneConfig(r=4, target_modules=targets("llama"), init_weights=False))
    randomize(bm, 0.05)
    x = ids(batch=2, seq=5)
    with torch.no_grad():
        want = logits(bm, x, adapter_names=["a", "b"])
    with torch.inference_mode():
        got = logits(bm, x, adapter_names=["a", "b"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_default_targets_are_recorded_in_the_saved_config(tmp_path):
    bm = get_bone_model(build("llama"), BoneConfig(r=4))  # target_modules=None: the Llama default applies
    assert sorted(bm.adapter_configs["default"].target_modules) == ["q_proj", "v_proj"]
    bm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
