"""The registry on object storage, against a real S3 server (SeaweedFS on loopback, see tests/s3server.py):
manifest-last publishes, overwrite and delete, interrupted publishes, corruption, and replicas that see
each other's changes without a restart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from core.access import OwnedAdapters
from core.auth import Principal
from core.errors import Conflict, CorruptAdapter, NotFound, ServiceUnavailable
from core.registry import AdapterRegistry, file_sha256
from core.settings import Settings
from core.storage import ObjectStorage, new_version

META = {"base_model": "embedded", "bone": {"r": 8}, "job_id": "job-1", "metrics": {"train_loss": 0.5}}


def _adapter_dir(tmp_path: Path, payload: bytes = b"weights-v1", r: int = 8) -> Path:
    src = tmp_path / f"src-{payload.hex()[:16]}"
    src.mkdir(exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "BONE", "r": r}))
    (src / "adapter_model.safetensors").write_bytes(payload)
    return src


@pytest.fixture
def registry(s3_server, s3_url, tmp_path) -> AdapterRegistry:  # noqa: F811
    return AdapterRegistry(
        s3_url, cache_dir=tmp_path / "cache", storage_options={"endpoint_url": s3_server.endpoint_url}
    )


def replica(s3_server, s3_url, tmp_path, label: str) -> AdapterRegistry:  # noqa: F811
    """Another process's view: its own filesystem client and its own weights cache."""
    return AdapterRegistry(
        s3_url, cache_dir=tmp_path / f"cache-{label}", storage_options={"endpoint_url": s3_server.endpoint_url}
    )


def keys(s3_server, s3_url) -> list[str]:  # noqa: F811
    fs = s3_server.fs
    base = s3_url.removeprefix("s3://")
    return sorted(k.removeprefix(base + "/") for k in fs.find(base))


def test_publish_get_list_and_verified_weights(registry, tmp_path, s3_server, s3_url):  # noqa: F811
    info = registry.publish("alpha", _adapter_dir(tmp_path), META)
    assert info.sha256 == file_sha256(tmp_path / "src-776569676874732d" / "adapter_model.safetensors")
    assert registry.exists("alpha") and registry.get("alpha") == info
    assert [i.name for i in registry.list()] == ["alpha"]
    assert registry.adapter_config("alpha") == {"peft_type": "BONE", "r": 8}
    assert registry.path("alpha") == f"{s3_url}/alpha"

    stored = keys(s3_server, s3_url)
    version = json.loads(s3_server.fs.cat_file(f"{s3_url}/alpha/manifest.json"))["version"]
    assert stored == [
        "alpha/manifest.json",
        f"alpha/{version}/adapter_config.json",
        f"alpha/{version}/adapter_model.safetensors",
    ]

    weights, got = registry.verified_weights("alpha")
    assert got == info and weights == tmp_path / "cache" / f"{info.sha256}.safetensors"
    assert weights.read_bytes() == b"weights-v1"
    # Later calls reuse the local copy: they work even with the object gone from the store.
    s3_server.fs.rm_file(f"{s3_url}/alpha/{version}/adapter_model.safetensors")
    assert registry.verified_weights("alpha")[0] == weights
    weights.unlink()  # ... and without the local copy, a missing object is refused, not served half
    with pytest.raises(CorruptAdapter, match="cannot read"):
        registry.verified_weights("alpha")


def test_conflict_unless_overwrite_and_old_version_removed(registry, tmp_path, s3_server, s3_url):  # noqa: F811
    first = registry.publish("alpha", _adapter_dir(tmp_path), META)
    with pytest.raises(Conflict):
        registry.publish("alpha", _adapter_dir(tmp_path, b"weights-v2"), META)
    second = registry.publish("alpha", _adapter_dir(tmp_path, b"weights-v2", r=4), META, overwrite=True)
    assert second.sha256 != first.sha256 and registry.get("alpha") == second
    assert registry.adapter_config("alpha")["r"] == 4
    assert registry.verified_weights("alpha")[0].read_bytes() == b"weights-v2"
    assert len(keys(s3_server, s3_url)) == 3  # manifest + the new version's two files: the old version is gone


def test_delete(registry, tmp_path, s3_server, s3_url):  # noqa: F811
    registry.publish("alpha", _adapter_dir(tmp_path), META)
    registry.publish("beta", _adapter_dir(tmp_path), META)
    registry.delete("alpha")
    assert [i.name for i in registry.list()] == ["beta"]
    assert not registry.exists("alpha")
    with pytest.raises(NotFound):
        registry.get("alpha")
    with pytest.raises(NotFound):
        registry.delete("alpha")
    assert all(k.startswith("beta/") for k in keys(s3_server, s3_url))


def test_interrupted_publish_is_invisible_and_swept_when_old(registry, tmp_path, s3_server, s3_url):  # noqa: F811
    fs = s3_server.fs
    src = _adapter_dir(tmp_path)
    abandoned = "v" + f"{int((time.time() - 7200) * 1000):013d}" + "-deadbeef"  # two hours old
    fresh = new_version()  # may still be uploading: sweep must leave it
    for version in (abandoned, fresh):
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            fs.put_file(str(src / file), f"{s3_url}/half/{version}/{file}")
    assert registry.list() == [] and not registry.exists("half")
    with pytest.raises(NotFound):
        registry.verified_weights("half")
    assert registry.sweep() == 1
    assert all(fresh in k for k in keys(s3_server, s3_url))


def test_corrupted_object_is_refused_naming_it(registry, tmp_path, s3_server, s3_url):  # noqa: F811
    registry.publish("alpha", _adapter_dir(tmp_path), META)
    version = json.loads(s3_server.fs.cat_file(f"{s3_url}/alpha/manifest.json"))["version"]
    obj = f"{s3_url}/alpha/{version}/adapter_model.safetensors"
    s3_server.fs.pipe_file(obj, b"weights-v1-but-flipped")
    with pytest.raises(CorruptAdapter, match=obj):
        registry.verified_weights("alpha")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing unverified is kept


def test_damaged_cache_copy_is_fetched_again(registry, tmp_path):
    info = registry.publish("alpha", _adapter_dir(tmp_path), META)
    weights, _ = registry.verified_weights("alpha")
    weights.write_bytes(b"bit rot")
    assert registry.verified_weights("alpha")[0].read_bytes() == b"weights-v1"
    assert file_sha256(weights) == info.sha256


def test_registries_under_sibling_prefixes_stay_apart(s3_server, s3_url, tmp_path):  # noqa: F811
    near = replica(s3_server, s3_url, tmp_path, "near")
    sibling = AdapterRegistry(
        s3_url + "2", cache_dir=tmp_path / "cache-2", storage_options={"endpoint_url": s3_server.endpoint_url}
    )
    sibling.publish("theirs", _adapter_dir(tmp_path), META)
    assert near.list() == [] and near.sweep() == 0 and [i.name for i in sibling.list()] == ["theirs"]


def test_replicas_see_each_other_without_restart(s3_server, s3_url, tmp_path):  # noqa: F811
    a, b = (replica(s3_server, s3_url, tmp_path, label) for label in "ab")
    assert b.list() == []
    published = a.publish("shared", _adapter_dir(tmp_path), META)
    assert [i.name for i in b.list()] == ["shared"] and b.get("shared") == published
    assert b.verified_weights("shared")[0].read_bytes() == b"weights-v1"
    replaced = b.publish("shared", _adapter_dir(tmp_path, b"weights-v2"), META, overwrite=True)
    assert a.get("shared") == replaced and a.verified_weights("shared")[0].read_bytes() == b"weights-v2"
    a.delete("shared")
    assert not b.exists("shared") and b.list() == []


def test_reader_racing_an_overwrite_gets_the_new_version(s3_server, s3_url, tmp_path):  # noqa: F811
    reader, writer = (replica(s3_server, s3_url, tmp_path, label) for label in ("reader", "writer"))
    writer.publish("hot", _adapter_dir(tmp_path), META)
    real_weights = reader.storage.weights
    calls = []

    def overwritten_meanwhile(name, sha256, check):
        if not calls:  # the reader has read the old manifest; the writer replaces the version now
            writer.publish("hot", _adapter_dir(tmp_path, b"weights-v2"), META, overwrite=True)
        calls.append(sha256)
        return real_weights(name, sha256, check)

    reader.storage.weights = overwritten_meanwhile
    weights, info = reader.verified_weights("hot")
    assert weights.read_bytes() == b"weights-v2" and info == writer.get("hot") and len(calls) == 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_manifest_put_is_conditional(registry, tmp_path, s3_server, s3_url, overwrite):  # noqa: F811
    """Two publishers that both read the old state: the store lets only the first manifest PUT through."""
    registry.publish("race", _adapter_dir(tmp_path), META)
    storage: ObjectStorage = registry.storage
    stale = (None, None, None) if not overwrite else ('"0123456789abcdef0123456789abcdef"', "v0000000000000-gone", None)
    storage._current = lambda name: stale  # what a publisher saw before the other one's manifest landed
    before = keys(s3_server, s3_url)
    with pytest.raises(Conflict, match="concurrently" if overwrite else "already exists"):
        storage.commit("race", _adapter_dir(tmp_path, b"weights-v2"), registry.get("race").model_dump_json(), overwrite)
    assert keys(s3_server, s3_url) == before  # the loser's version was removed; the winner's untouched
    assert registry.verified_weights("race")[0].read_bytes() == b"weights-v1"


def test_an_overwrite_is_judged_on_the_manifest_it_replaces(registry, tmp_path, s3_server, s3_url):  # noqa: F811
    registry.publish("owned", _adapter_dir(tmp_path), {**META, "owner": "bob"})
    before = keys(s3_server, s3_url)
    with pytest.raises(Conflict, match="in use"):
        registry.publish(
            "owned",
            _adapter_dir(tmp_path, b"weights-v2"),
            {**META, "owner": "alice"},
            overwrite=True,
            may_replace=lambda current: current.owner == "alice",
        )
    assert keys(s3_server, s3_url) == before and registry.get("owned").owner == "bob"
    registry.publish(
        "owned",
        _adapter_dir(tmp_path, b"weights-v2"),
        {**META, "owner": "bob"},
        overwrite=True,
        may_replace=lambda current: current.owner == "bob",
    )
    assert registry.verified_weights("owned")[0].read_bytes() == b"weights-v2"


def test_damaged_manifest_does_not_hide_the_others(registry, tmp_path, s3_server, s3_url):  # noqa: F811
    registry.publish("good", _adapter_dir(tmp_path), META)
    s3_server.fs.pipe_file(f"{s3_url}/bad/manifest.json", b"{not json")
    s3_server.fs.pipe_file(f"{s3_url}/worse/manifest.json", b"[]")
    assert [i.name for i in registry.list()] == ["good"]
    assert registry.publish("bad", _adapter_dir(tmp_path), META, overwrite=True) == registry.get("bad")
    registry.delete("worse")
    assert [i.name for i in registry.list()] == ["bad", "good"] and not registry.exists("worse")


def test_owner_scoped_view_shares_the_object_store(registry, tmp_path):
    owned = OwnedAdapters(registry, Principal("ann", "user", "k"))
    owned.publish("anns", _adapter_dir(tmp_path), META)
    registry.publish("bobs", _adapter_dir(tmp_path), {**META, "owner": "bob"})
    assert registry.get("anns").owner == "ann"
    assert [i.name for i in owned.list()] == ["anns"]
    with pytest.raises(NotFound):
        owned.get("bobs")


def test_from_settings(tmp_path, s3_server, s3_url):  # noqa: F811
    local = AdapterRegistry.from_settings(Settings(data_dir=tmp_path))
    assert local.root == tmp_path / "adapters"
    remote = AdapterRegistry.from_settings(
        Settings(data_dir=tmp_path, registry_url=s3_url, s3_endpoint_url=s3_server.endpoint_url)
    )
    assert remote.root == s3_url and remote.list() == []
    assert remote.storage.cache_dir == tmp_path / "registry-cache"
    assert AdapterRegistry(f"file://{tmp_path}/reg").root == tmp_path / "reg"


def test_unreachable_store_is_service_unavailable(tmp_path):
    from tests.e2e.conftest import free_port

    dead = AdapterRegistry(
        "s3://nowhere/reg",
        cache_dir=tmp_path / "cache",
        storage_options={
            "endpoint_url": f"http://127.0.0.1:{free_port()}",
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
            "retries": 1,
        },
    )
    with pytest.raises(ServiceUnavailable, match="s3://nowhere/reg"):
        dead.list()


def test_the_weights_cache_keeps_to_its_size_least_recently_used_first(s3_server, s3_url, tmp_path):  # noqa: F811
    payloads = {name: name.encode().ljust(300, b".") for name in ("one", "two", "three")}  # 300 bytes each
    bounded = AdapterRegistry(
        s3_url,
        cache_dir=tmp_path / "small-cache",
        cache_bytes=700,
        storage_options={"endpoint_url": s3_server.endpoint_url},
    )
    for name, payload in payloads.items():
        bounded.publish(name, _adapter_dir(tmp_path, payload), META)
    paths = {name: bounded.verified_weights(name)[0] for name in ("one", "two")}
    os.utime(paths["one"], (1, 1))  # "one" used long ago ...
    os.utime(paths["two"], (2, 2))
    assert bounded.verified_weights("one")[0] == paths["one"]  # ... until now: a hit marks it recently used
    bounded.verified_weights("three")  # 900 bytes > 700: the least recently used copy ("two") goes
    assert sorted(p.name for p in (tmp_path / "small-cache").glob("*.safetensors")) == sorted(
        bounded.get(name).sha256 + ".safetensors" for name in ("one", "three")
    )
    assert bounded.verified_weights("two")[0].read_bytes() == payloads["two"]  # fetched again when asked


# --- start-up capability check and loading what was hashed ------------------------------------------------------
def test_the_store_s_conditional_writes_are_checked_at_start(registry):
    registry.check_storage()  # SeaweedFS refuses a second If-None-Match create: fine


def test_a_store_that_ignores_conditional_writes_is_refused(registry, monkeypatch):
    from core.storage.objects import StorageCapabilityError

    fs = registry.storage.fs
    unconditional = fs.pipe_file

    def drops_the_condition(path, data, mode="overwrite", **kwargs):  # what s3fs < 2024.12 does with mode="create"
        return unconditional(path, data, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", drops_the_condition)
    with pytest.raises(StorageCapabilityError, match="ignored a conditional write"):
        registry.check_storage()


def test_an_old_s3fs_is_refused_by_version(registry, monkeypatch):
    import s3fs

    from core.storage.objects import StorageCapabilityError

    monkeypatch.setattr(s3fs, "__version__", "2024.6.0")
    with pytest.raises(StorageCapabilityError, match=r"s3fs>=2024\.12"):
        registry.check_storage()


def test_tensors_are_loaded_from_the_bytes_that_were_hashed(registry, tmp_path):
    import torch
    from safetensors.torch import save

    payload = save({"w": torch.arange(4.0)})
    registry.publish("tensors", _adapter_dir(tmp_path, payload), META)
    tensors, info = registry.verified_tensors("tensors")  # downloaded, checked, loaded from memory
    assert torch.equal(tensors["w"], torch.arange(4.0))
    cached = tmp_path / "cache" / f"{info.sha256}.safetensors"
    assert cached.read_bytes() == payload
    cached.write_bytes(save({"w": torch.zeros(4)}))  # a damaged local copy is fetched again, not loaded
    tensors, _ = registry.verified_tensors("tensors")
    assert torch.equal(tensors["w"], torch.arange(4.0))
