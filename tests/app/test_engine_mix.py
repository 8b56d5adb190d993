"""Mixes in the engine: the virtual adapter's blocks are bit-for-bit the offline composition, it is cached
under a key derived from its sources' versions, and evicting a source evicts its mixes."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from app.engine import BASE_MODEL, GenerationRequest, Target
from app.engine.adapter_pool import mix_name, mix_sha256
from app.engine.batch import SamplingParams
from bone import BoneConfig, combine_bone_adapters
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter


def _mix(registry: AdapterRegistry, weights: dict[str, float]):
    return tuple(sorted((n, registry.get(n).sha256, w) for n, w in weights.items()))


def test_mix_blocks_equal_the_offline_sum_and_are_evicted_with_a_source(make_engine):
    engine = make_engine()
    settings = engine.settings
    publish_adapter(settings, "ea", seed=31)
    publish_adapter(settings, "eb", seed=32, target_modules=("q_proj", "up_proj"))
    registry = AdapterRegistry(settings.registry_dir)
    weights = {"eb": 0.25, "ea": -1.5}
    mix = _mix(registry, weights)
    params = SamplingParams(max_new_tokens=4, temperature=0)
    result = engine.submit(GenerationRequest(Target(mix=mix), engine.tokenize("hello"), params)).future.result(120)
    assert result.adapter is None and result.adapters == {"ea": -1.5, "eb": 0.25}

    key = (mix_name(mix), mix_sha256(mix))
    slot = engine.cache.slots()[key]
    items = [
        (n, BoneConfig.from_dict(registry.adapter_config(n)), load_file(registry.verified_weights(n)[0]), w)
        for n, w in sorted(weights.items())
    ]
    _, want = combine_bone_adapters(items)
    layers = dict(engine.host.bone_model.bone_layers())
    assert want
    for key_, block in want.items():
        path = key_.removeprefix("base_model.model.").removesuffix(".bone_block")
        assert torch.equal(layers[path].bone_block[slot].detach(), block), path

    engine.evict_adapter("eb")  # deleted / overwritten source: its mixes go too
    # a step: the control ran
    engine.submit(GenerationRequest(BASE_MODEL, engine.tokenize("x"), params)).future.result(120)
    assert key not in engine.cache.slots()
    assert mix_name(mix).startswith("~") and not registry.exists("ea-eb")
