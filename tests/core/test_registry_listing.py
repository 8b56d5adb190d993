"""The registry listing is reused while the registry folder's mtime stands still (core/storage/local.py
``listing_stamp``): every publish, overwrite and delete must still show in the very next listing."""

from __future__ import annotations

import os
import time

import pytest

import core.storage.local
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter


@pytest.fixture
def trusting(monkeypatch):
    # Trust any mtime at once, so every listing below is served from the cache when the stamp allows it.
    monkeypatch.setattr(core.storage.local, "LISTING_SETTLED_S", 0.0)


def names(registry: AdapterRegistry) -> list[str]:
    return [info.name for info in registry.list()]


def test_publish_overwrite_delete_show_at_once(settings, trusting):
    registry = AdapterRegistry(settings.registry_dir)
    publish_adapter(settings, "alpha", seed=0)
    assert registry.storage.listing_stamp() is not None  # the patch took effect: listings below are cached
    assert names(registry) == ["alpha"]
    assert registry.list()[0] is registry.list()[0]  # served from the cache: the same parsed entry

    publish_adapter(settings, "beta", seed=1)
    assert names(registry) == ["alpha", "beta"]

    before = registry.get("alpha").sha256
    publish_adapter(settings, "alpha", seed=2, overwrite=True)
    after = {info.name: info.sha256 for info in registry.list()}
    assert after["alpha"] != before and after["alpha"] == registry.get("alpha").sha256

    registry.delete("beta")
    assert names(registry) == ["alpha"]


def test_recent_mtime_is_not_trusted(settings):
    # With the default window a folder changed a moment ago gives no stamp: the listing is read afresh, so
    # a change within the filesystem's timestamp granularity cannot hide behind an unmoved mtime.
    registry = AdapterRegistry(settings.registry_dir)
    publish_adapter(settings, "alpha", seed=0)
    assert registry.storage.listing_stamp() is None
    old = time.time() - 60
    os.utime(registry.root, (old, old))
    stamp = registry.storage.listing_stamp()
    assert stamp is not None
    publish_adapter(settings, "beta", seed=1)
    assert registry.storage.listing_stamp() != stamp
    assert names(registry) == ["alpha", "beta"]


def test_cached_json_matches_the_model(settings, trusting):
    import json

    publish_adapter(settings, "alpha", seed=0)
    info = AdapterRegistry(settings.registry_dir).list()[0]
    assert json.loads(info.json_bytes()) == info.model_dump(mode="json")


def test_an_overwrite_is_judged_under_the_publish_lock(settings):
    from core.errors import Conflict

    registry = AdapterRegistry(settings.registry_dir)
    publish_adapter(settings, "owned", seed=0)
    source = registry.path("owned")
    before = registry.get("owned")
    with pytest.raises(Conflict, match="in use"):
        registry.publish(
            "owned",
            source,
            {"base_model": "embedded", "bone": before.bone, "owner": "alice"},
            overwrite=True,
            may_replace=lambda current: current.owner == "alice",
        )
    assert registry.get("owned") == before
    assert not [p for p in registry.root.iterdir() if p.name.startswith((".staging-", ".trash-"))]
    replaced = registry.publish(
        "owned",
        source,
        {"base_model": "embedded", "bone": before.bone},
        overwrite=True,
        may_replace=lambda current: current.owner is None,
    )
    assert registry.get("owned") == replaced and replaced.created_at > before.created_at
