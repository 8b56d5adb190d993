"""Adapter names (core/names.py): the one rule, its boundaries, and the names derived from a name."""

from __future__ import annotations

import itertools
import re

import pytest
from pydantic import BaseModel, ValidationError

from core.names import (
    BASE_ADAPTER,
    MAX_LENGTH,
    TRAINING_SLOT,
    AdapterName,
    is_adapter_name,
    max_length_with_checkpoints,
)

SHA = "0123456789ab" + "f" * 52
OTHER_SHA = "ba9876543210" + "f" * 52
# What a module-dict key inside a BoneModel may be: letters, digits, '_' and '-', never '.'.
MODULE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")

GOOD = ["a", "0", "a.b", "a_b", "a-b", "v1.2-rc_3", "a.", "a-", "a_", "x" * MAX_LENGTH, "default"]
BAD = [
    "",
    "A",
    "Has Spaces",
    "a/b",
    "/tmp/x",
    "../x",
    "..",
    "a..b",
    ".hidden",
    "-x",
    "_x",
    "x" * (MAX_LENGTH + 1),
    "abc\n",  # '$' in a match() would accept this trailing newline
    "caf\u00e9",
    "a\x00b",
    "~mix-0123",
    BASE_ADAPTER,
]


class Named(BaseModel):
    adapter_name: AdapterName
    mix: dict[AdapterName, float] = {}


@pytest.mark.parametrize("name", GOOD)
def test_names_in_the_alphabet_up_to_the_limit_are_accepted(name):
    assert is_adapter_name(name)
    assert AdapterName(name) == name
    assert isinstance(Named(adapter_name=name).adapter_name, AdapterName)


@pytest.mark.parametrize("name", BAD)
def test_names_outside_the_rule_are_refused_everywhere(name):
    assert not is_adapter_name(name)
    with pytest.raises(ValueError):
        AdapterName(name)
    with pytest.raises(ValidationError) as refused:
        Named(adapter_name=name)
    assert refused.value.errors()[0]["loc"] == ("adapter_name",)


def test_a_mix_key_is_checked_as_a_name():
    with pytest.raises(ValidationError) as refused:
        Named(adapter_name="ok", mix={"../x": 1.0})
    assert refused.value.errors()[0]["loc"][0] == "mix"


def test_the_length_bound_runs_before_the_pattern():
    with pytest.raises(ValidationError) as refused:
        Named(adapter_name="a" * 1_000_000)
    assert refused.value.errors()[0]["type"] == "string_too_long"


def test_names_round_trip_as_plain_strings():
    named = Named(adapter_name="a.b", mix={"c": 0.5})
    assert named.model_dump() == {"adapter_name": "a.b", "mix": {"c": 0.5}}
    again = Named.model_validate_json(named.model_dump_json())
    assert again == named and isinstance(again.adapter_name, AdapterName)


def test_the_schema_states_the_rule():
    schema = Named.model_json_schema()["properties"]["adapter_name"]
    assert schema["maxLength"] == MAX_LENGTH
    assert schema["pattern"] == AdapterName.PATTERN
    assert re.fullmatch(schema["pattern"].strip("^$"), "x" * MAX_LENGTH)


def test_no_adapter_can_take_the_base_key():
    assert not is_adapter_name(BASE_ADAPTER)


def test_checkpoint_names_are_names_and_fit_below_the_checkpoint_limit():
    limit = max_length_with_checkpoints(2_000_000)
    assert limit == 51  # the limit POST /jobs states for publish_checkpoints
    longest = AdapterName("n" * limit)
    assert longest.checkpoint(9_999_999) == "n" * limit + "-step-9999999"
    assert isinstance(longest.checkpoint(1), AdapterName)
    with pytest.raises(ValueError):
        AdapterName("n" * (limit + 1)).checkpoint(9_999_999)
    assert max_length_with_checkpoints(10**9) == MAX_LENGTH - len("-step-") - 10  # more steps allowed: less room
    assert max_length_with_checkpoints(100) == limit  # fewer: the same limit on every server


def test_slots_are_stable_module_keys():
    assert AdapterName("my.adapter-v1").slot(SHA) == "a_myDadapter-v1_0123456789ab"
    assert AdapterName("my.adapter-v1").slot(SHA) == AdapterName("my.adapter-v1").slot(SHA)
    for name in GOOD:
        slot = AdapterName(name).slot(SHA)
        assert MODULE_KEY.fullmatch(slot), slot
        assert slot not in (BASE_ADAPTER, TRAINING_SLOT)


def test_slots_are_distinct_for_distinct_names_and_versions():
    alphabet = "a0._-"
    names = [
        "".join(chars)
        for n in range(1, 4)
        for chars in itertools.product(alphabet, repeat=n)
        if is_adapter_name("".join(chars))
    ]
    assert len(names) > 50
    slots = {AdapterName(name).slot(SHA) for name in names}
    assert len(slots) == len(names)  # "a.b", "a_b" and "a-b" never share a slot
    assert AdapterName("a").slot(SHA) != AdapterName("a").slot(OTHER_SHA)
