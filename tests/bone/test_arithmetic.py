"""Exact adapter arithmetic: Σ wᵢ Bᵢ is itself a Bone adapter whose logits equal the summed blocks'."""

import pytest
import torch

from bone import BoneConfig, BoneConfigError, combine_bone_adapters, get_bone_model
from tests.bone.tiny import build, ids, randomize


def _state(seed, r=4, target_modules=("q_proj", "v_proj", "down_proj"), init=False):
    bm = get_bone_model(build("llama"), BoneConfig(r=r, target_modules=list(target_modules), init_weights=init))
    randomize(bm, 0.05, seed=seed)
    return bm.adapter_configs["default"], bm.get_adapter_state_dict("default")


def _logits_of(config, tensors, x):
    bm = get_bone_model(build("llama"), config.replace(init_weights=True))
    with torch.no_grad():
        for key, value in tensors.items():
            path = key.removeprefix("base_model.model.").removesuffix(".bone_block")
            bm.base_model.get_submodule(path).bone_block["default"].copy_(value)
        return bm(input_ids=x).logits


def test_weighted_sum_equals_the_model_with_summed_blocks():
    (ca, ta), (cb, tb) = _state(1), _state(2, target_modules=("q_proj", "o_proj"))
    config, summed = combine_bone_adapters([("a", ca, ta, 0.7), ("b", cb, tb, 0.3)])
    assert sorted({k.rsplit(".", 2)[-2] for k in summed}) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    x = ids(batch=2, seq=6)
    # the reference: a model holding both adapters' blocks, scaled, active together (Bone adds up)
    bm = get_bone_model(build("llama"), BoneConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj", "o_proj"]))
    with torch.no_grad():
        for tensors, weight in ((ta, 0.7), (tb, 0.3)):
            for key, value in tensors.items():
                path = key.removeprefix("base_model.model.").removesuffix(".bone_block")
                bm.base_model.get_submodule(path).bone_block["default"].add_(weight * value)
        want = bm(input_ids=x).logits
    torch.testing.assert_close(_logits_of(config, summed, x), want, atol=1e-5, rtol=1e-5)


def test_weights_one_and_zero_reproduce_the_single_adapter():
    (ca, ta), (cb, tb) = _state(1), _state(2)
    config, summed = combine_bone_adapters([("a", ca, ta, 1.0), ("b", cb, tb, 0.0)])
    x = ids(batch=2, seq=6)
    torch.testing.assert_close(_logits_of(config, summed, x), _logits_of(ca, ta, x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "other, match",
    [
        (dict(init="bat"), "Bat"),
        (dict(r=2), "r=2"),
    ],
)
def test_uncombinable_adapters_are_refused_by_name(other, match):
    ca, ta = _state(1)
    cb, tb = _state(2, **other)
    with pytest.raises(BoneConfigError, match=match) as info:
        combine_bone_adapters([("a", ca, ta, 0.5), ("b", cb, tb, 0.5)])
    assert "'b'" in str(info.value)
