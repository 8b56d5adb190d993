"""Regex targets (bone/targets.py): matched with RE2 when it is installed, so a pattern that makes Python's re
backtrack exponentially matches in linear time; a construct RE2 lacks still works for library users (re)."""

from __future__ import annotations

import time

import pytest

from bone import BoneConfig
from bone.targets import compile_target_regex, find_targets
from tests.bone.tiny import build

re2 = pytest.importorskip("re2")


def test_a_backtracking_pattern_matches_in_linear_time():
    pattern = r"model\.layers\.[01]\.(?:[\w.]|[\w.])*Z"  # exponential in Python's re on a long name
    name = "model.layers.0." + "a" * 5000
    started = time.perf_counter()
    assert compile_target_regex(pattern).fullmatch(name) is None
    assert time.perf_counter() - started < 1.0


def test_look_around_still_works_for_library_users():
    config = BoneConfig(r=4, target_modules=r"model\.layers\.(?=0\.).*\.q_proj")
    assert [t.name for t in find_targets(build("llama"), config)] == ["model.layers.0.self_attn.q_proj"]


def test_re2_and_re_agree_on_ordinary_patterns():
    config = BoneConfig(r=4, target_modules=r".*\.0\.self_attn\.(q|k)_proj")
    assert [t.name for t in find_targets(build("llama"), config)] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]
