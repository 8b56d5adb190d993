import json

import pytest

from bone import BoneConfig, BoneConfigError
from bone.errors import BoneCheckpointError, BoneError


def test_defaults_match_peft():
    c = BoneConfig()
    assert (c.r, c.target_modules, c.exclude_modules, c.init_weights) == (64, None, None, True)
    assert (c.layers_to_transform, c.layers_pattern, c.bias, c.modules_to_save) == (None, None, "none", None)
    assert (c.base_model_name_or_path, c.task_type) == (None, None)
    assert c.variant == "bone"


def test_error_hierarchy():
    assert issubclass(BoneError, ValueError)
    assert issubclass(BoneConfigError, BoneError) and issubclass(BoneCheckpointError, BoneError)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.0}, "r"),
        ({"r": True}, "r"),
        ({"init_weights": "foo"}, "init_weights"),
        ({"init_weights": 1.5}, "init_weights"),
        ({"init_weights": None}, "init_weights"),
        ({"target_modules": 3}, "target_modules"),
        ({"target_modules": ["q_proj", 1]}, "target_modules"),
        ({"target_modules": "q_proj[("}, "target_modules"),
        ({"exclude_modules": 5}, "exclude_modules"),
        ({"bias": "some"}, "bias"),
        ({"task_type": "NOPE"}, "task_type"),
        ({"layers_to_transform": -1}, "layers_to_transform"),
        ({"layers_to_transform": ["0"]}, "layers_to_transform"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "layers_pattern"),
        ({"layers_pattern": 3}, "layers_pattern"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"mini_r": 0}, "mini_r"),
        ({"miss_dropout": 1.0}, "miss_dropout"),
        ({"miss_dropout": -0.1}, "miss_dropout"),
        ({"peft_type": "LORA"}, "peft_type"),
        ({"inference_mode": "yes"}, "inference_mode"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(BoneConfigError) as ei:
        BoneConfig(**kwargs)
    assert ei.value.field == field
    assert field in str(ei.value)


@pytest.mark.parametrize(
    "init, variant", [(True, "bone"), (False, "bone"), ("bat", "bat"), ("BAT", "bat"), ("mini", "mini")]
)
def test_variants(init, variant):
    assert BoneConfig(init_weights=init).variant == variant


def test_list_targets_normalised_and_layers():
    c = BoneConfig(target_modules=["v_proj", "q_proj", "q_proj"], layers_to_transform=1, layers_pattern=["layers"])
    assert c.target_modules == ["q_proj", "v_proj"]
    assert c.layers_to_transform == [1] and c.layers_pattern == "layers"
    assert BoneConfig(bias="MiSS_only").bias == "bone_only"
    assert BoneConfig(task_type="CAUSAL_LM").task_type == "CAUSAL_LM"


def test_to_dict_is_peft_bone_layout():
    d = BoneConfig(r=8, target_modules=["q_proj"], init_weights="bat").to_dict()
    assert d["peft_type"] == "BONE" and d["r"] == 8 and d["init_weights"] == "bat"
    assert set(d) == {
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "exclude_modules",
        "inference_mode",
        "init_weights",
        "layers_pattern",
        "layers_to_transform",
        "modules_to_save",
        "peft_type",
        "r",
        "revision",
        "target_modules",
        "task_type",
    }
    m = BoneConfig(r=8, target_modules=["q_proj"], bias="bone_only").to_dict("miss")
    assert m["peft_type"] == "MISS" and m["mini_r"] == 1 and m["miss_dropout"] == 0.0 and m["bias"] == "MiSS_only"


@pytest.mark.parametrize(
    "kwargs, field", [({"init_weights": "mini"}, "init_weights"), ({"miss_dropout": 0.1}, "miss_dropout")]
)
def test_miss_only_fields_refuse_bone_format(kwargs, field):
    c = BoneConfig(**kwargs)
    with pytest.raises(BoneConfigError, match=field):
        c.to_dict("bone")
    assert c.to_dict("miss")["peft_type"] == "MISS"


@pytest.mark.parametrize("fmt", ["bone", "miss"])
def test_round_trip(fmt, tmp_path):
    c = BoneConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        init_weights=False,
        layers_to_transform=[0],
        layers_pattern="layers",
        bias="all",
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    c.save_pretrained(tmp_path, format=fmt)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["peft_type"] == fmt.upper()
    back = BoneConfig.from_pretrained(tmp_path)
    assert back.replace(peft_type="BONE") == c


def test_from_dict_reads_peft_files():
    peft_bone = {
        "peft_type": "BONE",
        "peft_version": "0.18.1",
        "r": 8,
        "init_weights": "bat",
        "auto_mapping": None,
        "target_modules": ["q_proj"],
        "revision": None,
        "inference_mode": True,
        "something_new": 1,
    }
    c = BoneConfig.from_dict(peft_bone)
    assert c.r == 8 and c.variant == "bat" and c.inference_mode
    miss = {
        "peft_type": "MISS",
        "r": 16,
        "init_weights": "mini",
        "mini_r": 4,
        "miss_dropout": 0.1,
        "bias": "MiSS_only",
        "target_modules": ["q_proj"],
    }
    c = BoneConfig.from_dict(miss)
    assert (c.variant, c.mini_r, c.miss_dropout, c.bias, c.peft_type) == ("mini", 4, 0.1, "bone_only", "MISS")
    with pytest.raises(BoneConfigError, match="peft_type"):
        BoneConfig.from_dict({"peft_type": "LORA", "r": 8})
    with pytest.raises(BoneConfigError, match="init_weights"):
        BoneConfig.from_dict({"peft_type": "BONE", "init_weights": "foo"})


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(BoneCheckpointError, match="adapter_config.json"):
        BoneConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(BoneCheckpointError, match="cannot read"):
        BoneConfig.from_pretrained(tmp_path)
