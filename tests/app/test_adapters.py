"""The registry over HTTP: list, one adapter's metadata, delete."""

from __future__ import annotations

from tests.app.conftest import publish_adapter


def test_list_get_delete(client, live):
    assert client.get("/adapters").json() == {"object": "list", "data": [], "has_more": False}
    first = publish_adapter(live.settings, "alpha", seed=1)
    publish_adapter(live.settings, "beta.v2", seed=2, r=8)

    listed = client.get("/adapters").json()["data"]
    assert [a["name"] for a in listed] == ["alpha", "beta.v2"]
    meta = client.get("/adapters/alpha").json()
    assert meta["sha256"] == first.sha256 and meta["size_bytes"] == first.size_bytes
    assert meta["base_model"] == "embedded" and meta["bone"]["r"] == 4 and meta["object"] == "adapter"

    assert client.delete("/adapters/alpha").json() == {"id": "alpha", "object": "adapter", "deleted": True}
    assert [a["name"] for a in client.get("/adapters").json()["data"]] == ["beta.v2"]
    missing = client.get("/adapters/alpha")
    assert missing.status_code == 404 and "alpha" in missing.json()["error"]["message"]


def test_hidden_leftovers_are_never_listed(client, live):
    (live.settings.registry_dir / ".staging-123").mkdir()
    publish_adapter(live.settings, "real", seed=1)
    assert [a["name"] for a in client.get("/adapters").json()["data"]] == ["real"]
    assert client.get("/adapters/.staging-123").status_code == 404


def test_adapter_listing_is_paginated_by_name(live, client):
    from tests.app.conftest import publish_adapter

    for i in range(5):
        publish_adapter(live.settings, f"page-{i}", seed=i)
    first = client.get("/adapters", params={"limit": 2}).json()
    assert [a["name"] for a in first["data"]] == ["page-0", "page-1"] and first["has_more"]
    rest = client.get("/adapters", params={"limit": 10, "after": "page-1"}).json()
    assert [a["name"] for a in rest["data"]] == ["page-2", "page-3", "page-4"] and not rest["has_more"]
    assert client.get("/adapters", params={"limit": 0}).status_code == 422


def test_listing_follows_overwrites_and_deletes_at_once(live, client):
    from tests.app.conftest import publish_adapter

    first = publish_adapter(live.settings, "fresh", seed=1)
    assert [a["sha256"] for a in client.get("/adapters").json()["data"]] == [first.sha256]
    second = publish_adapter(live.settings, "fresh", seed=2, overwrite=True)
    assert [a["sha256"] for a in client.get("/adapters").json()["data"]] == [second.sha256]
    client.delete("/adapters/fresh")
    assert client.get("/adapters").json()["data"] == []
