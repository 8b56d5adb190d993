"""Bone → LoRA export: exact for Bone (current PEFT's LoRA reproduces our logits), SVD for Bat."""

import pytest
import torch

from bone import BoneConfig, BoneConfigError, get_bone_model, to_lora
from bone.export import DEFAULT_BAT_TOLERANCE, EXACT_RELATIVE_ERROR, selection_matrix
from bone.functional import bone_delta
from tests.bone.tiny import build, ids, randomize, targets


def _adapter(name, r, init=False, seed=1):
    bm = get_bone_model(build(name), BoneConfig(r=r, target_modules=targets(name), init_weights=init))
    randomize(bm, 0.05, seed=seed)
    return bm


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("r,fin", [(4, 12), (3, 10), (8, 5)])  # divisible, ragged, r > in
def test_selection_matrix_reproduces_the_tiled_delta(r, fin):
    block = torch.randn(r, 7)
    assert torch.equal(block.t() @ selection_matrix(r, fin), bone_delta(block, fin))


PEFT_WARNINGS = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning"
)  # PEFT 0.18 on transformers 5


@PEFT_WARNINGS
@pytest.mark.parametrize("name", ["llama", "llama-odd", "gpt2"])
def test_peft_lora_reproduces_bone_logits(name):
    peft = pytest.importorskip("peft")
    bm = _adapter(name, r=4)
    x = ids(batch=2, seq=6)
    want = _logits(bm, x)
    export = to_lora(build(name), bm.adapter_configs["default"], bm.get_adapter_state_dict("default"))
    assert export.exact and export.rank == 4 and export.config["lora_alpha"] == 4
    lora_config = peft.LoraConfig(
        **{k: v for k, v in export.config.items() if k not in ("peft_type", "inference_mode", "revision")}
    )
    model = peft.get_peft_model(build(name), lora_config)
    missing = peft.set_peft_model_state_dict(model, export.tensors)
    assert not missing.unexpected_keys
    torch.testing.assert_close(_logits(model, x), want, atol=1e-5, rtol=1e-5)


@PEFT_WARNINGS
def test_saved_lora_folder_loads_with_peft_from_pretrained(tmp_path):
    peft = pytest.importorskip("peft")
    bm = _adapter("llama", r=4)
    x = ids(batch=2, seq=6)
    to_lora(build("llama"), bm.adapter_configs["default"], bm.get_adapter_state_dict("default")).save(tmp_path)
    loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path)
    assert loaded.peft_config["default"].peft_type == peft.PeftType.LORA
    torch.testing.assert_close(_logits(loaded, x), _logits(bm, x), atol=1e-5, rtol=1e-5)


def test_bat_exports_through_svd_with_its_error_reported():
    bm = _adapter("llama", r=4, init="bat")
    config, tensors = bm.adapter_configs["default"], bm.get_adapter_state_dict("default")
    full = to_lora(build("llama"), config, tensors, bat_rank=64)  # ≥ every layer's rank: exact up to fp error
    assert full.exact and full.max_relative_error < EXACT_RELATIVE_ERROR
    low = to_lora(build("llama"), config, tensors, bat_rank=2)
    assert not low.exact and 0 < low.max_relative_error < 1 and set(low.relative_errors) == set(full.relative_errors)


@pytest.mark.parametrize("tolerance", [0.5, 0.1, 1e-2, 1e-4])
def test_bat_tolerance_picks_the_smallest_rank_that_meets_it(tolerance):
    bm = _adapter("llama", r=4, init="bat")
    config, tensors = bm.adapter_configs["default"], bm.get_adapter_state_dict("default")
    export = to_lora(build("llama"), config, tensors, tolerance=tolerance)
    assert export.max_relative_error <= tolerance * (1 + 1e-3)
    if export.rank > 1:  # one rank less misses the tolerance somewhere
        below = to_lora(build("llama"), config, tensors, bat_rank=export.rank - 1)
        assert below.max_relative_error > tolerance


def test_bat_default_export_meets_the_default_tolerance():
    bm = _adapter("llama", r=4, init="bat")
    config, tensors = bm.adapter_configs["default"], bm.get_adapter_state_dict("default")
    export = to_lora(build("llama"), config, tensors)
    assert export.max_relative_error <= DEFAULT_BAT_TOLERANCE
    with pytest.raises(BoneConfigError, match="not both"):
        to_lora(build("llama"), config, tensors, bat_rank=4, tolerance=1e-3)


def test_bat_export_needs_real_weights():
    bm = _adapter("llama", r=4, init="bat")
    with torch.device("meta"):
        meta = build("llama").to("meta")
    with pytest.raises(BoneConfigError, match="real weights"):
        to_lora(meta, bm.adapter_configs["default"], bm.get_adapter_state_dict("default"))


def test_bias_training_adapters_are_refused():
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=["q_proj"], bias="all"))
    with pytest.raises(BoneConfigError, match="biases"):
        to_lora(build("llama"), bm.adapter_configs["default"], bm.get_adapter_state_dict("default"))
