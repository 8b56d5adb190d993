"""Every failure leaves in OpenAI's envelope, naming the field at fault (over a real server)."""

from __future__ import annotations

import pytest

from app.errors import summarize_validation_errors

RECORDS = {"records": [{"text": "hello"}]}


def job(**fields):
    return {"adapter_name": "ok", "dataset": RECORDS, **fields}


BAD_JOBS = [
    # (body, status, param)
    ({}, 422, "adapter_name"),
    ({"dataset": RECORDS}, 422, "adapter_name"),
    (job(adapter_name="Has Spaces"), 422, "adapter_name"),
    (job(adapter_name="../escape"), 422, "adapter_name"),
    (job(adapter_name="a" * 65), 422, "adapter_name"),
    ({"adapter_name": "ok"}, 422, "dataset"),
    (job(dataset={"records": []}), 422, "dataset.records"),
    (job(dataset={"unknown": 1}), 422, "dataset"),
    (job(dataset={"records": [{"text": "x"}], "path": "a.jsonl"}), 422, "dataset"),
    (job(dataset={"records": [{"text": "x"}, {"txt": "typo"}]}), 422, "dataset.records.1"),
    (job(dataset={"records": [{"messages": [{"role": "user"}]}]}), 422, "dataset.records.0.messages.0"),
    (job(dataset={"records": [{"text": "x"}] * 6}), 422, "dataset.records"),  # over max_inline_records
    (job(dataset={"path": "../outside.jsonl"}), 422, "dataset.path"),
    (job(dataset={"path": "/etc/passwd"}), 422, "dataset.path"),
    (job(dataset={"path": "missing.jsonl"}), 422, "dataset.path"),
    (job(dataset={"file_id": "../x"}), 422, "dataset.file_id"),
    (job(training={"learning_rate": -1}), 422, "training.learning_rate"),
    (job(training={"learning_rate": "fast"}), 422, "training.learning_rate"),
    (job(training={"lr": 0.1}), 422, "training.lr"),
    (job(training={"max_seq_length": 4096}), 422, "training.max_seq_length"),  # over the server's limit
    (job(bone={"r": 0}), 422, "bone.r"),
    (job(bone={"r": 65}), 422, "bone.r"),  # over max_r
    (job(bone={"r": 5, "init_weights": "bat"}), 422, "bone.r"),  # 256 % 5 != 0
    (job(bone={"target_modules": ["no_such_layer"]}), 422, "bone.target_modules"),
    (job(bone={"target_modules": 5}), 422, "bone.target_modules"),
    (job(bone={"init_weights": "lora"}), 422, "bone.init_weights"),
    (job(base_model="/etc"), 422, "base_model"),
    (job(surprise=True), 422, "surprise"),
]


@pytest.mark.parametrize("body, status, param", BAD_JOBS, ids=[p for _, _, p in BAD_JOBS])
def test_bad_job_bodies_name_the_field(client, body, status, param):
    reply = client.post("/jobs", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"]
    assert client.get("/jobs").json()["data"] == []  # nothing was queued


BAD_GENERATIONS = [
    ({}, 422, "prompt"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 65}, 422, "max_new_tokens"),  # over the server's limit
    ({"prompt": "hi", "temperature": -0.5}, 422, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
    ({"prompt": "hi", "stop": [""]}, 422, "stop"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"prompt": "hi", "adapter": "nobody"}, 404, "adapter"),
    ({"prompt": "hi", "adapter": "../../etc"}, 404, "adapter"),
    ({"prompt": "hi", "temprature": 0}, 422, "temprature"),
]


@pytest.mark.parametrize("body, status, param", BAD_GENERATIONS, ids=[p for _, _, p in BAD_GENERATIONS])
def test_bad_generate_bodies_name_the_field(client, body, status, param):
    reply = client.post("/generate", json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_malformed_json_is_422_not_500(client):
    reply = client.post("/jobs", content=b'{"adapter_name": ', headers={"content-type": "application/json"})
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/no/such/route", 404),
        ("DELETE", "/healthz", 405),
        ("GET", "/jobs/job-does-not-exist", 404),
        ("POST", "/jobs/job-does-not-exist/cancel", 404),
        ("GET", "/jobs/job-does-not-exist/events", 404),
        ("GET", "/adapters/nobody", 404),
        ("DELETE", "/adapters/nobody", 404),
        ("GET", "/jobs?limit=0", 422),
        ("GET", "/jobs?after=job-unknown", 404),
    ],
)
def test_http_errors_use_the_envelope(client, method, path, status):
    reply = client.request(method, path)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_body_over_the_limit_is_413(client, live):
    huge = {"adapter_name": "big", "dataset": {"records": [{"text": "x" * (live.settings.max_body_bytes + 10)}]}}
    reply = client.post("/jobs", json=huge)
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "payload_too_large"


def test_chunked_body_over_the_limit_is_413(client, live):
    def chunks():
        for _ in range(live.settings.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    reply = client.post("/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "payload_too_large"


def test_union_errors_pick_the_shape_the_client_meant():
    errors = [
        {"type": "too_short", "loc": ("body", "dataset", "RecordsDataset", "records"), "msg": "too short"},
        {"type": "missing", "loc": ("body", "dataset", "PathDataset", "path"), "msg": "Field required"},
        {"type": "extra_forbidden", "loc": ("body", "dataset", "PathDataset", "records"), "msg": "Extra"},
    ]
    assert summarize_validation_errors(errors) == ("dataset.records", "dataset.records: too short", "invalid_value")


@pytest.mark.parametrize(
    "status, type_, expected",
    [  # OpenAI's table, on /v1 only
        (422, "invalid_request_error", (400, "invalid_request_error")),
        (400, "invalid_request_error", (400, "invalid_request_error")),
        (401, "authentication_error", (401, "authentication_error")),
        (403, "forbidden", (403, "permission_error")),
        (404, "not_found", (404, "invalid_request_error")),
        (409, "conflict", (409, "invalid_request_error")),
        (413, "invalid_request_error", (413, "invalid_request_error")),
        (429, "rate_limit_error", (429, "rate_limit_error")),
        (500, "server_error", (500, "server_error")),
        (503, "service_unavailable", (503, "server_error")),
    ],
)
def test_openai_routes_map_statuses_and_types(status, type_, expected):
    from app.errors import is_openai_path, openai_status_and_type

    assert openai_status_and_type(status, type_) == expected
    assert is_openai_path("/v1/completions") and is_openai_path("/v1") and not is_openai_path("/v1x/jobs")
    assert not is_openai_path("/generate") and not is_openai_path("/adapters/v1/download")


def test_native_routes_keep_422_and_their_types(client):
    reply = client.post("/generate", json={"prompt": ""})
    assert reply.status_code == 422 and reply.json()["error"]["type"] == "invalid_request_error"
    missing = client.get("/adapters/no-such-adapter")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
