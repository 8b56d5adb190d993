"""API keys over HTTP: 401 without a (valid) key, owners see only their own jobs and adapters (another owner's
ids answer 404 word for word like missing ones), admins see everything, per-key rate limits answer 429 with
Retry-After. The server runs with keys configured; no worker runs here."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest

from core.access import OwnedAdapters
from core.auth import Principal
from core.keys import KeyEntry, generate_key, hash_key
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter

ALICE, BOB, ROOT = generate_key(), generate_key(), generate_key()
SERVER_SETTINGS = {
    "api_keys": [
        KeyEntry("alice", "user", hash_key(ALICE)).line(),
        KeyEntry("bob", "user", hash_key(BOB)).line(),
        KeyEntry("root", "admin", hash_key(ROOT)).line(),
    ],
    "rate_limit_training": 4,
    "rate_limit_generation": 1000,
}
RECORDS = [{"prompt": "2+2=", "completion": "4"}]
PUBLIC = {"/healthz", "/readyz"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_job(client: httpx.Client, key: str, name: str, **fields) -> dict:
    reply = client.post(
        "/jobs", headers=bearer(key), json={"adapter_name": name, "dataset": {"records": RECORDS}, **fields}
    )
    assert reply.status_code == 202, reply.text
    return reply.json()


def publish_as(live, owner: str, name: str, seed: int = 0):
    """An adapter published by ``owner`` (what a job of theirs, or their import, leaves in the registry)."""
    publish_adapter(live.settings, name, seed=seed)
    registry = AdapterRegistry(live.settings.registry_dir)
    with tempfile.TemporaryDirectory() as folder:
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            (Path(folder) / file).write_bytes((registry.path(name) / file).read_bytes())
        info = registry.get(name)
        registry.delete(name)
        return OwnedAdapters(registry, Principal(owner, "user", "k")).publish(
            name, Path(folder), {"base_model": info.base_model, "bone": info.bone}
        )


# --- authentication -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers, code",
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer bsk-not-a-key"}, "invalid_api_key"),
        ({"Authorization": f"Basic {ALICE}"}, "missing_api_key"),
        ({"Authorization": ALICE}, "missing_api_key"),
    ],
)
def test_no_key_or_a_wrong_key_is_401_in_the_envelope(client, headers, code):
    for method, path in (("GET", "/jobs"), ("GET", "/adapters"), ("POST", "/generate"), ("GET", "/v1/models")):
        reply = client.request(method, path, headers=headers, json={"prompt": "x"} if method == "POST" else None)
        assert reply.status_code == 401, (path, reply.text)
        assert reply.json() == {
            "error": {
                "message": reply.json()["error"]["message"],
                "type": "authentication_error",
                "param": None,
                "code": code,
            }
        }
        assert reply.headers["www-authenticate"] == "Bearer"
        assert ALICE not in reply.text


def test_health_probes_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_every_route_but_the_probes_requires_a_key(client, live):
    """A router added without the guard would show up here. (Outside the API schema: /metrics, the Prometheus
    scrape of aggregate counts, and the /ui redirect to the static dashboard, which asks for a key itself.)"""
    checked = 0
    for path, operations in live.app.openapi()["paths"].items():
        if path in PUBLIC:
            continue
        for method in operations:
            reply = client.request(method.upper(), path.replace("{", "").replace("}", ""))  # any path parameter value
            assert reply.status_code == 401, (method, path, reply.status_code, reply.text)
            checked += 1
    assert checked >= 10


def test_an_unknown_query_parameter_without_a_key_is_still_401(client):
    # The key is checked first: a caller without one learns nothing about what a route takes (app.query_params).
    reply = client.get("/adapters", params={"limt": 5})
    assert reply.status_code == 401 and reply.json()["error"]["param"] is None
    reply = client.get("/adapters", params={"limt": 5}, headers=bearer(ALICE))
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "limt"


# --- ownership: jobs ------------------------------------------------------------------------------------------
def test_jobs_belong_to_the_key_that_created_them(client):
    mine = create_job(client, ALICE, "alice-a")
    theirs = create_job(client, BOB, "bob-a")
    assert mine["owner"] == "alice" and theirs["owner"] == "bob"

    assert [j["id"] for j in client.get("/jobs", headers=bearer(ALICE)).json()["data"]] == [mine["id"]]
    assert [j["id"] for j in client.get("/jobs", headers=bearer(BOB)).json()["data"]] == [theirs["id"]]
    admin_view = {j["id"] for j in client.get("/jobs", headers=bearer(ROOT)).json()["data"]}
    assert admin_view == {mine["id"], theirs["id"]}
    assert client.get(f"/jobs/{theirs['id']}", headers=bearer(ROOT)).status_code == 200


@pytest.mark.parametrize(
    "method, suffix", [("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/events?stream=true")]
)
def test_another_owners_job_answers_exactly_like_a_missing_one(client, method, suffix):
    theirs = create_job(client, BOB, "bob-b")
    missing = "job-" + "0" * 20
    other = client.request(method, f"/jobs/{theirs['id']}{suffix}", headers=bearer(ALICE))
    absent = client.request(method, f"/jobs/{missing}{suffix}", headers=bearer(ALICE))
    assert other.status_code == absent.status_code == 404
    assert other.json() == {
        "error": {**absent.json()["error"], "message": absent.json()["error"]["message"].replace(missing, theirs["id"])}
    }
    # ... and nothing happened to it
    assert client.get(f"/jobs/{theirs['id']}", headers=bearer(BOB)).json()["status"] == "queued"


def test_another_owners_job_id_is_no_cursor(client):
    theirs = create_job(client, BOB, "bob-c")
    reply = client.get("/jobs", params={"after": theirs["id"]}, headers=bearer(ALICE))
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "after"


# --- ownership: adapters --------------------------------------------------------------------------------------
def test_adapters_are_listed_and_read_by_their_owner_only(client, live):
    publish_as(live, "alice", "alice-ad", seed=1)
    publish_as(live, "bob", "bob-ad", seed=2)
    names = lambda key: [a["name"] for a in client.get("/adapters", headers=bearer(key)).json()["data"]]  # noqa: E731
    assert names(ALICE) == ["alice-ad"] and names(BOB) == ["bob-ad"]
    assert names(ROOT) == ["alice-ad", "bob-ad"]
    assert client.get("/adapters/alice-ad", headers=bearer(ALICE)).json()["owner"] == "alice"

    other = client.get("/adapters/bob-ad", headers=bearer(ALICE))
    absent = client.get("/adapters/nothing-here", headers=bearer(ALICE))
    assert other.status_code == absent.status_code == 404
    assert other.json()["error"]["message"] == absent.json()["error"]["message"].replace("nothing-here", "bob-ad")

    models = {m["id"] for m in client.get("/v1/models", headers=bearer(ALICE)).json()["data"]}
    assert "alice-ad" in models and "bob-ad" not in models


def test_another_owners_adapter_cannot_be_deleted_or_used(client, live):
    publish_as(live, "bob", "bob-only", seed=3)
    assert client.delete("/adapters/bob-only", headers=bearer(ALICE)).status_code == 404
    gen = client.post(
        "/generate", headers=bearer(ALICE), json={"adapter": "bob-only", "prompt": "hi", "max_new_tokens": 2}
    )
    assert gen.status_code == 404 and gen.json()["error"]["param"] == "adapter", gen.text
    oai = client.post(
        "/v1/completions", headers=bearer(ALICE), json={"model": "bob-only", "prompt": "hi", "max_tokens": 2}
    )
    assert oai.status_code == 404, oai.text
    # Its owner (and an admin) can.
    for key in (BOB, ROOT):
        ok = client.post(
            "/generate", headers=bearer(key), json={"adapter": "bob-only", "prompt": "hi", "max_new_tokens": 2}
        )
        assert ok.status_code == 200, ok.text
    assert client.delete("/adapters/bob-only", headers=bearer(BOB)).status_code == 200


def test_a_name_another_owner_holds_cannot_be_trained_over(client, live):
    publish_as(live, "bob", "taken", seed=4)
    for overwrite in (False, True):
        reply = client.post(
            "/jobs",
            headers=bearer(ALICE),
            json={"adapter_name": "taken", "overwrite": overwrite, "dataset": {"records": RECORDS}},
        )
        assert reply.status_code == 409 and reply.json()["error"]["code"] == "adapter_exists", reply.text
    assert create_job(client, BOB, "taken", overwrite=True)["owner"] == "bob"
    # An admin's job publishes as the admin: training over bob's adapter would silently take his name.
    reply = client.post(
        "/jobs",
        headers=bearer(ROOT),
        json={"adapter_name": "taken", "overwrite": True, "dataset": {"records": RECORDS}},
    )
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "adapter_exists", reply.text


# --- rate limits ------------------------------------------------------------------------------------------------
def test_rate_limit_is_per_key_and_answers_429_with_retry_after(client):
    for i in range(SERVER_SETTINGS["rate_limit_training"]):
        create_job(client, ALICE, f"burst-{i}")
    over = client.post(
        "/jobs", headers=bearer(ALICE), json={"adapter_name": "burst-x", "dataset": {"records": RECORDS}}
    )
    assert over.status_code == 429, over.text
    assert over.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(over.headers["retry-after"]) <= 61
    create_job(client, BOB, "bob-still-fine")  # another key has its own budget
    assert client.get("/jobs", headers=bearer(ALICE)).status_code == 200  # reads are not limited


def test_another_owners_file_is_neither_readable_nor_trainable(client):
    upload = client.post("/files", headers=bearer(BOB), files={"file": ("rows.jsonl", b'{"text": "bob\'s row"}\n')})
    assert upload.status_code == 201, upload.text
    file_id = upload.json()["id"]
    assert client.get(f"/files/{file_id}", headers=bearer(ALICE)).status_code == 404
    assert file_id not in {f["id"] for f in client.get("/files", headers=bearer(ALICE)).json()["data"]}
    for field in ("dataset", "validation_dataset"):
        body = {"adapter_name": "stolen", "dataset": {"records": RECORDS}, field: {"file_id": file_id}}
        other = client.post("/jobs", headers=bearer(ALICE), json=body)
        absent = client.post("/jobs", headers=bearer(ALICE), json={**body, field: {"file_id": "file-missing"}})
        assert other.status_code == absent.status_code == 422, other.text
        assert other.json()["error"]["param"] == f"{field}.file_id" == absent.json()["error"]["param"]
        assert other.json()["error"]["message"] == absent.json()["error"]["message"].replace("file-missing", file_id)
    assert create_job(client, BOB, "bobs-own", dataset={"file_id": file_id})["owner"] == "bob"


def test_openai_clients_get_openai_errors_for_keys_and_ownership(client, live):
    import openai

    publish_as(live, "bob", "bobs-model", seed=3)
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="bsk-not-a-key", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.models.list()
    assert refused.value.body["type"] == "authentication_error" and refused.value.body["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=ALICE, max_retries=0) as alice:
        with pytest.raises(openai.NotFoundError) as hidden:  # another owner's adapter reads as a missing one
            alice.models.retrieve("bobs-model")
        assert hidden.value.body["type"] == "invalid_request_error" and hidden.value.body["code"] == "model_not_found"
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=BOB, max_retries=0) as bob:
        assert bob.models.retrieve("bobs-model").owned_by == "bob"
