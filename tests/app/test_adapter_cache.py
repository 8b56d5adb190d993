"""The adapter cache over a real registry: keyed by name + sha256, LRU-bounded by count and bytes."""

from __future__ import annotations

import pytest

from app.adapter_cache import AdapterCache, slot_name
from core.errors import CorruptAdapter, NotFound
from core.registry import WEIGHTS_FILE, AdapterRegistry
from tests.app.conftest import publish_adapter


class RecordingHost:
    """Stands in for the model: records what the cache adds and deletes."""

    def __init__(self) -> None:
        self.slots: dict[str, dict] = {}

    def add_adapter(self, slot, config, tensors) -> None:
        assert slot not in self.slots
        self.slots[slot] = tensors

    def delete_adapter(self, slot) -> None:
        del self.slots[slot]


@pytest.fixture
def registry(settings):
    return AdapterRegistry(settings.registry_dir)


def test_lru_by_count_and_bytes(settings, registry):
    infos = [publish_adapter(settings, f"a{i}", seed=i) for i in range(4)]
    host = RecordingHost()
    cache = AdapterCache(registry, host, max_count=3, max_bytes=10**9)
    for info in infos[:3]:
        cache.acquire(info.name, info.sha256)
    cache.acquire("a0", infos[0].sha256)  # a0 is now the most recent: a1 goes first
    cache.acquire("a3", infos[3].sha256)
    assert set(cache.slots()) == {("a0", infos[0].sha256), ("a2", infos[2].sha256), ("a3", infos[3].sha256)}
    assert set(host.slots) == set(cache.slots().values())

    by_bytes = AdapterCache(registry, RecordingHost(), max_count=100, max_bytes=2 * infos[0].size_bytes)
    for info in infos:
        by_bytes.acquire(info.name, info.sha256)
    assert len(by_bytes) == 2 and by_bytes.resident_bytes <= 2 * infos[0].size_bytes


def test_pinned_slots_survive_even_over_the_limit(settings, registry):
    infos = [publish_adapter(settings, f"p{i}", seed=i) for i in range(3)]
    cache = AdapterCache(registry, RecordingHost(), max_count=1, max_bytes=10**9)
    pinned: set[str] = set()
    for info in infos:  # one batch needs all three at once
        pinned.add(cache.acquire(info.name, info.sha256, pinned))
    assert len(cache) == 3
    cache.acquire("p0", infos[0].sha256)  # the next batch shrinks it back
    assert list(cache.slots()) == [("p0", infos[0].sha256)]


def test_republish_replaces_the_old_version(settings, registry):
    old = publish_adapter(settings, "v", seed=1)
    host = RecordingHost()
    cache = AdapterCache(registry, host, max_count=10, max_bytes=10**9)
    assert cache.acquire("v", old.sha256) == slot_name("v", old.sha256)
    new = publish_adapter(settings, "v", seed=2, overwrite=True)
    assert cache.acquire("v", new.sha256) == slot_name("v", new.sha256)
    assert list(cache.slots()) == [("v", new.sha256)] and list(host.slots) == [slot_name("v", new.sha256)]
    assert cache.evict("v") == 1 and not host.slots


def test_missing_and_corrupt_adapters(settings, registry):
    cache = AdapterCache(registry, RecordingHost(), max_count=10, max_bytes=10**9)
    with pytest.raises(NotFound):
        cache.acquire("ghost", "0" * 64)
    info = publish_adapter(settings, "bad", seed=1)
    (registry.path("bad") / WEIGHTS_FILE).write_bytes(b"not the weights")
    with pytest.raises(CorruptAdapter, match="bad"):
        cache.acquire("bad", info.sha256)
    assert len(cache) == 0


def test_slot_names_are_valid_module_keys():
    assert slot_name("my.adapter-v1", "ab" * 32) == "a_my_adapter_v1_" + "ab" * 6
