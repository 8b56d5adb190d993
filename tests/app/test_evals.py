"""Evaluations over HTTP: POST /evals validates, stores and enqueues by dotted path; RQ's SimpleWorker (burst,
in this process, on the real Redis) runs the task; GET /evals/{id} and GET /adapters/{name} show the results.
Errors: unknown adapter 404, empty adapters 422, another base model 409; owners see only their own."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
from rq import Queue, SimpleWorker
from rq.job import Job as RQJob

from core.access import OwnedAdapters
from core.auth import Principal
from core.keys import KeyEntry, generate_key, hash_key
from core.queueing import EVAL_TASK
from core.registry import AdapterRegistry
from tests.app.conftest import TEST_LIMITS, LiveServer, make_settings, publish_adapter
from worker import context

ROWS = [
    {"prompt": "2+2=", "completion": "4"},
    {"text": "plain text row"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def create(client: httpx.Client, adapters, headers=None, **fields) -> dict:
    reply = client.post(
        "/evals",
        headers=headers,
        json={"adapters": adapters, "dataset": {"records": ROWS}, "max_new_tokens": 4, **fields},
    )
    assert reply.status_code == 202, reply.text
    return reply.json()


def work(live: LiveServer, redis_conn) -> None:
    context.use_settings(live.settings)
    try:
        SimpleWorker([Queue(live.settings.queue_name, connection=redis_conn)], connection=redis_conn).work(burst=True)
    finally:
        context.use_settings(None)


def test_an_evaluation_runs_on_a_worker_and_shows_on_each_adapter(client, live, redis_conn):
    publish_adapter(live.settings, "alpha", seed=1)
    publish_adapter(live.settings, "beta.v2", seed=2)  # '.' in a name: fine in the registry, not as a module key
    created = create(client, ["alpha", "beta.v2"], batch_size=2)
    assert created["status"] == "queued" and created["id"].startswith("eval-")
    assert created["dataset"] == {"records": 3} and created["results"] == {}
    rq_job = RQJob.fetch(created["id"], connection=redis_conn)
    assert rq_job.func_name == EVAL_TASK and rq_job.args == (created["id"],)
    assert rq_job.timeout == live.settings.job_timeout_s

    work(live, redis_conn)
    done = client.get(f"/evals/{created['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    assert set(done["results"]) == {"alpha", "beta.v2", "__base__"}
    for metrics in done["results"].values():
        assert metrics["examples"] == 3 and metrics["tokens"] > 0 and metrics["exact_match_examples"] == 2
        assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
        assert 0 <= metrics["token_accuracy"] <= 1 and 0 <= metrics["exact_match"] <= 1
    assert done["results"]["alpha"]["loss"] != done["results"]["__base__"]["loss"]

    adapter = client.get("/adapters/alpha").json()
    assert adapter["latest_eval"]["eval_id"] == done["id"]
    assert adapter["latest_eval"]["metrics"] == done["results"]["alpha"]
    assert adapter["latest_eval"]["base"] == done["results"]["__base__"]
    assert adapter["latest_eval"]["sha256"] == adapter["sha256"]
    listed = client.get("/evals").json()
    assert [e["id"] for e in listed["data"]] == [done["id"]] and listed["has_more"] is False

    # a new version of the adapter does not inherit the old version's eval
    publish_adapter(live.settings, "alpha", seed=3, overwrite=True)
    assert client.get("/adapters/alpha").json()["latest_eval"] is None


def test_an_evaluation_without_the_base(client, live, redis_conn):
    publish_adapter(live.settings, "alpha", seed=1)
    created = create(client, ["alpha"], include_base=False, max_new_tokens=0)
    work(live, redis_conn)
    done = client.get(f"/evals/{created['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    assert list(done["results"]) == ["alpha"] and done["results"]["alpha"]["exact_match"] is None


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"adapters": []}, 422, "adapters"),
        ({"adapters": ["alpha", "alpha"]}, 422, "adapters"),
        ({"adapters": ["alpha", "nope"]}, 404, "adapters.1"),
        ({"adapters": ["alpha", "other-base"]}, 409, "adapters.1"),
        ({"adapters": ["alpha"], "max_new_tokens": 10_000}, 422, "max_new_tokens"),
        ({"adapters": ["alpha"], "dataset": {"records": [{"prompt": "no completion"}]}}, 422, "dataset.records.0"),
        ({"adapters": ["alpha"], "dataset": {"file_id": "file-missing"}}, 422, "dataset.file_id"),
    ],
)
def test_bad_requests_name_the_field(client, live, redis_conn, body, status, param):
    publish_adapter(live.settings, "alpha", seed=1)
    publish_adapter(live.settings, "other-base", seed=2, base_model="some/other-model")
    reply = client.post("/evals", json={"dataset": {"records": ROWS}, **body})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param)
    if status == 404:
        assert "'nope'" in error["message"]
    assert Queue(live.settings.queue_name, connection=redis_conn).count == 0  # nothing queued


def test_unknown_ids_and_cancel(client, live, redis_conn):
    assert client.get("/evals/eval-nope").status_code == 404
    publish_adapter(live.settings, "alpha", seed=1)
    created = create(client, ["alpha"])
    cancelled = client.post(f"/evals/{created['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    work(live, redis_conn)  # the cancelled RQ job never runs
    assert client.get(f"/evals/{created['id']}").json()["status"] == "cancelled"
    assert client.post(f"/evals/{created['id']}/cancel").status_code == 409


def test_a_running_evaluation_whose_process_died_reads_as_failed(client, live, redis_conn):
    from rq.job import JobStatus as RQStatus

    from core.evals import EvalStore
    from core.jobs import JobStatus

    publish_adapter(live.settings, "alpha", seed=1)
    created = create(client, ["alpha"])
    EvalStore(redis_conn).transition(created["id"], None, status=JobStatus.RUNNING)
    assert client.get(f"/evals/{created['id']}").json()["status"] == "running"
    RQJob.fetch(created["id"], connection=redis_conn).set_status(
        RQStatus.FAILED
    )  # what RQ records for a killed work-horse
    done = client.get(f"/evals/{created['id']}").json()
    assert done["status"] == "failed" and "died" in done["error"]


# --- owners -----------------------------------------------------------------------------------------------
ALICE, BOB = generate_key(), generate_key()


def publish_as(live: LiveServer, owner: str, name: str) -> None:
    """An adapter owned by ``owner``, as one of their jobs would leave it."""
    publish_adapter(live.settings, name, seed=0)
    registry = AdapterRegistry(live.settings.registry_dir)
    info = registry.get(name)
    with tempfile.TemporaryDirectory() as folder:
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            (Path(folder) / file).write_bytes((registry.path(name) / file).read_bytes())
        registry.delete(name)
        OwnedAdapters(registry, Principal(owner, "user", "k")).publish(
            name, Path(folder), {"base_model": info.base_model, "bone": info.bone}
        )


@pytest.fixture(scope="module")
def secured(tmp_path_factory, shared_models_dir):
    keys = [KeyEntry("alice", "user", hash_key(ALICE)).line(), KeyEntry("bob", "user", hash_key(BOB)).line()]
    settings = make_settings(
        tmp_path_factory.mktemp("api-keys") / "data", shared_models_dir, **TEST_LIMITS, api_keys=keys
    )
    with LiveServer(settings) as server:
        yield server


def test_owners_evaluate_and_see_only_their_own(secured, redis_url):
    publish_as(secured, "alice", "alices")
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    with secured.client() as http:
        assert http.post("/evals", json={"adapters": ["alices"], "dataset": {"records": ROWS}}).status_code == 401
        reply = http.post("/evals", headers=bob, json={"adapters": ["alices"], "dataset": {"records": ROWS}})
        assert reply.status_code == 404 and reply.json()["error"]["param"] == "adapters.0"
        created = create(http, ["alices"], headers=alice)
        assert created["owner"] == "alice"
        assert http.get(f"/evals/{created['id']}", headers=alice).status_code == 200
        missing = http.get("/evals/eval-nope", headers=bob).json()
        hidden = http.get(f"/evals/{created['id']}", headers=bob).json()
        assert hidden["error"]["message"].replace(created["id"], "eval-nope") == missing["error"]["message"]
        assert http.get("/evals", headers=bob).json()["data"] == []
        assert [e["id"] for e in http.get("/evals", headers=alice).json()["data"]] == [created["id"]]
        assert http.post(f"/evals/{created['id']}/cancel", headers=bob).status_code == 404


def test_unset_bounds_follow_a_server_capped_below_the_defaults(tmp_path_factory, shared_models_dir, redis_url):
    settings = make_settings(
        tmp_path_factory.mktemp("low-caps") / "data", shared_models_dir, max_seq_length=128, max_new_tokens=8
    )
    publish_adapter(settings, "capped", seed=0)
    with LiveServer(settings) as server, server.client() as http:
        reply = http.post("/evals", json={"adapters": ["capped"], "dataset": {"records": ROWS}})
        assert reply.status_code == 202, reply.text
        assert (reply.json()["max_seq_length"], reply.json()["max_new_tokens"]) == (128, 8)
        asked = http.post("/evals", json={"adapters": ["capped"], "dataset": {"records": ROWS}, "max_new_tokens": 9})
        assert asked.status_code == 422 and asked.json()["error"]["param"] == "max_new_tokens"  # said, so refused
