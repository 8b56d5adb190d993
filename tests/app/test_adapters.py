"""The registry over HTTP: list, one adapter's metadata, delete."""

from __future__ import annotations

from tests.app.conftest import publish_adapter


def test_list_get_delete(client, live):
    assert client.get("/adapters").json() == {"object": "list", "data": []}
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
