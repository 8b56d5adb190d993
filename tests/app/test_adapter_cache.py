"""The adapter cache over a real registry: keyed by name + sha256, device pool LRU-bounded by count and
bytes, a host-memory tier below it, pins, and a loader that reads adapters off the caller's thread."""

from __future__ import annotations

import threading

import pytest

import app.engine.adapter_pool as adapter_cache
from app.engine.adapter_pool import AdapterCache, AdapterLoader, fetch_adapter, mix_name, slot_name
from core.errors import CorruptAdapter, NotFound
from core.names import AdapterName
from core.registry import WEIGHTS_FILE, AdapterRegistry
from tests.app.conftest import publish_adapter


class RecordingHost:
    """Stands in for the model: records what the cache adds and deletes."""

    def __init__(self) -> None:
        self.slots: dict[str, dict] = {}
        self.adds = 0

    def add_adapter(self, slot, config, tensors) -> None:
        assert slot not in self.slots
        self.slots[slot] = tensors
        self.adds += 1

    def delete_adapter(self, slot) -> None:
        del self.slots[slot]


@pytest.fixture
def registry(settings):
    return AdapterRegistry(settings.registry_dir)


def tensor_bytes(registry, name) -> int:
    return fetch_adapter(registry, name).size_bytes


def test_lru_by_count_and_bytes(settings, registry):
    infos = [publish_adapter(settings, f"a{i}", seed=i) for i in range(4)]
    host = RecordingHost()
    cache = AdapterCache(registry, host, max_count=3, max_bytes=10**9)
    for info in infos[:3]:
        cache.acquire(info.name, info.sha256)
    cache.acquire("a0", infos[0].sha256)  # a0 is now the most recent: a1 goes first
    cache.acquire("a3", infos[3].sha256)
    assert set(cache.slots()) == {("a0", infos[0].sha256), ("a2", infos[2].sha256), ("a3", infos[3].sha256)}
    assert set(host.slots) == set(cache.slots().values()) and cache.evictions == 1

    size = tensor_bytes(registry, "a0")
    by_bytes = AdapterCache(registry, RecordingHost(), max_count=100, max_bytes=2 * size)
    for info in infos:
        by_bytes.acquire(info.name, info.sha256)
    assert len(by_bytes) == 2 and by_bytes.resident_bytes <= 2 * size


def test_slots_in_use_survive_over_the_limit_then_shrink(settings, registry):
    infos = [publish_adapter(settings, f"p{i}", seed=i) for i in range(3)]
    cache = AdapterCache(registry, RecordingHost(), max_count=1, max_bytes=10**9)
    in_use: set[str] = set()
    for info in infos:  # one batch needs all three at once
        in_use.add(cache.acquire(info.name, info.sha256, in_use))
    assert len(cache) == 3
    assert not cache.has_room(1, in_use)  # the engine makes newcomers wait instead of overflowing further
    cache.shrink({slot_name("p2", infos[2].sha256)})  # rows finished; p2 still runs
    assert list(cache.slots()) == [("p2", infos[2].sha256)]


def test_cpu_tier_reinstalls_without_touching_disk(settings, registry):
    a, b = publish_adapter(settings, "warm-a", seed=1), publish_adapter(settings, "warm-b", seed=2)
    host = RecordingHost()
    cache = AdapterCache(registry, host, max_count=1, max_bytes=10**9, cpu_bytes=10**9)
    cache.acquire("warm-a", a.sha256)
    cache.acquire("warm-b", b.sha256)  # evicts warm-a from the device; its tensors stay in host memory
    assert list(cache.slots()) == [("warm-b", b.sha256)]
    (registry.path("warm-a") / WEIGHTS_FILE).write_bytes(b"gone")  # a disk read would now fail
    assert cache.acquire("warm-a", a.sha256) == slot_name("warm-a", a.sha256)
    assert host.adds == 3

    tiny = AdapterCache(registry, RecordingHost(), max_count=1, max_bytes=10**9, cpu_bytes=0)
    tiny.acquire("warm-b", b.sha256)
    assert tiny.cpu_get(("warm-b", b.sha256)) is None  # no CPU tier at 0 bytes


def test_pinned_adapters_are_never_evicted(settings, registry):
    infos = [publish_adapter(settings, f"pin{i}", seed=i) for i in range(3)]
    cache = AdapterCache(registry, RecordingHost(), max_count=2, max_bytes=10**9, pinned=["pin0"])
    for info in infos + infos[1:]:
        cache.acquire(info.name, info.sha256)
    assert ("pin0", infos[0].sha256) in cache.slots() and len(cache) == 2
    assert cache.evict("pin0") == 1  # a deleted adapter goes even when pinned


def test_republish_replaces_the_old_version(settings, registry):
    old = publish_adapter(settings, "v", seed=1)
    host = RecordingHost()
    cache = AdapterCache(registry, host, max_count=10, max_bytes=10**9, cpu_bytes=10**9)
    assert cache.acquire("v", old.sha256) == slot_name("v", old.sha256)
    new = publish_adapter(settings, "v", seed=2, overwrite=True)
    assert cache.acquire("v", new.sha256) == slot_name("v", new.sha256)
    assert list(cache.slots()) == [("v", new.sha256)] and list(host.slots) == [slot_name("v", new.sha256)]
    assert cache.cpu_get(("v", old.sha256)) is None
    assert cache.evict("v") == 1 and not host.slots


def test_evicting_an_adapter_in_use_waits_for_its_rows(settings, registry):
    info = publish_adapter(settings, "busy", seed=1)
    cache = AdapterCache(registry, RecordingHost(), max_count=10, max_bytes=10**9)
    slot = cache.acquire("busy", info.sha256)
    assert cache.evict("busy", in_use={slot}) == 0
    assert cache.resident(("busy", info.sha256)) is None  # never handed to a new request
    cache.shrink(in_use=set())
    assert len(cache) == 0


def test_missing_and_corrupt_adapters(settings, registry):
    cache = AdapterCache(registry, RecordingHost(), max_count=10, max_bytes=10**9)
    with pytest.raises(NotFound):
        cache.acquire("ghost", "0" * 64)
    info = publish_adapter(settings, "bad", seed=1)
    (registry.path("bad") / WEIGHTS_FILE).write_bytes(b"not the weights")
    with pytest.raises(CorruptAdapter, match="bad"):
        cache.acquire("bad", info.sha256)
    assert len(cache) == 0


def test_loader_reads_off_the_calling_thread_once_per_name(settings, registry, monkeypatch):
    info = publish_adapter(settings, "bg", seed=1)
    done = threading.Event()
    reports, readers = [], []
    real_fetch = adapter_cache.fetch_adapter

    def recording_fetch(registry, name):
        readers.append(threading.current_thread().name)
        return real_fetch(registry, name)

    monkeypatch.setattr(adapter_cache, "fetch_adapter", recording_fetch)
    loader = AdapterLoader(registry, lambda name, fetched, error: (reports.append((name, fetched, error)), done.set()))
    loader.fetch("bg")
    loader.fetch("bg")  # already in flight: not read twice
    assert done.wait(30)
    loader.close()
    assert len(reports) == 1 and reports[0][0] == "bg" and reports[0][1].sha256 == info.sha256
    assert readers == ["adapter-loader_0"]  # read on a loader thread, never the caller's (the model thread)


def test_slot_names_are_distinct_module_keys():
    sha = "ab" * 32
    assert slot_name("my.adapter-v1", sha) == AdapterName("my.adapter-v1").slot(sha)
    mix = mix_name((("a", sha, 0.5), ("b", sha, 0.5)))
    slots = {slot_name(name, sha) for name in ("a.b", "a_b", "a-b", mix)}
    assert len(slots) == 4 and not any("." in slot or "~" in slot for slot in slots)
