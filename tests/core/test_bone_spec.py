"""``BoneSpec`` (the API's Bone request) is derived from ``bone.BoneConfig``: same defaults except the
documented ``r``, the same rule for ``r``, and it becomes exactly the BoneConfig the worker trains with."""

import dataclasses

import pytest
from pydantic import ValidationError

from bone.config import BoneConfig, BoneConfigError
from core.jobs import API_DEFAULT_R, BoneSpec


def test_defaults_are_bone_configs_except_r():
    spec = BoneSpec()
    defaults = {f.name: f.default for f in dataclasses.fields(BoneConfig)}
    for name, value in spec.model_dump().items():
        assert value == (API_DEFAULT_R if name == "r" else defaults[name]), name
    assert spec.r == 8 and defaults["r"] == 64  # the API documents 8; PEFT's default is 64


@pytest.mark.parametrize("r", [0, -3])
def test_r_follows_bone_configs_rule(r):
    with pytest.raises(BoneConfigError):
        BoneConfig(r=r)
    with pytest.raises(ValidationError, match="`r` must be a positive integer"):
        BoneSpec(r=r)


def test_to_config_carries_every_field():
    spec = BoneSpec(r=4, target_modules=["q_proj"], init_weights="bat", bias="bone_only", layers_to_transform=[1, 0])
    config = spec.to_config(task_type="CAUSAL_LM")
    assert (config.r, config.target_modules, config.init_weights, config.bias) == (4, ["q_proj"], "bat", "bone_only")
    assert config.layers_to_transform == [0, 1] and config.task_type == "CAUSAL_LM"
    with pytest.raises(BoneConfigError, match="layers_to_transform"):
        BoneSpec(target_modules="q_proj", layers_to_transform=0).to_config()
