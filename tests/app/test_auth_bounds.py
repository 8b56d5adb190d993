"""Every input bound in one table, over HTTP: each is a clear 4xx in the error envelope, naming the field where
one is at fault (body and upload sizes, inline records, r, sequence length, max_new_tokens, adapter names,
dataset paths, local base models, trust_remote_code)."""

from __future__ import annotations

import pytest

from tests.app.conftest import TEST_LIMITS

SERVER_SETTINGS = {"max_upload_bytes": 256 * 1024}
ROW = {"text": "a row"}


def job(**fields) -> dict:
    return {"adapter_name": "bounded", "dataset": {"records": [ROW]}, **fields}


CASES = [
    # (id, method, path, json body, status, param)
    (
        "records",
        "POST",
        "/jobs",
        job(dataset={"records": [ROW] * (TEST_LIMITS["max_inline_records"] + 1)}),
        422,
        "dataset.records",
    ),
    ("r", "POST", "/jobs", job(bone={"r": TEST_LIMITS["max_r"] + 1}), 422, "bone.r"),
    ("r-zero", "POST", "/jobs", job(bone={"r": 0}), 422, "bone.r"),
    (
        "seq-len",
        "POST",
        "/jobs",
        job(training={"max_seq_length": TEST_LIMITS["max_seq_length"] + 1}),
        422,
        "training.max_seq_length",
    ),
    ("name-traversal", "POST", "/jobs", job(adapter_name="../../etc"), 422, "adapter_name"),
    ("name-dotdot", "POST", "/jobs", job(adapter_name="a..b"), 422, "adapter_name"),
    ("name-absolute", "POST", "/jobs", job(adapter_name="/tmp/x"), 422, "adapter_name"),
    ("name-slash", "POST", "/jobs", job(adapter_name="a/b"), 422, "adapter_name"),
    ("name-upper", "POST", "/jobs", job(adapter_name="A"), 422, "adapter_name"),
    ("name-long", "POST", "/jobs", job(adapter_name="a" * 65), 422, "adapter_name"),
    ("name-newline", "POST", "/jobs", job(adapter_name="abc\n"), 422, "adapter_name"),
    ("eval-name", "POST", "/evals", {"adapters": ["A"], "dataset": {"records": [ROW]}}, 422, "adapters.0"),
    ("compose-name", "POST", "/adapters/Bad/compose", {"adapters": {"a": 1.0}}, 422, "name"),
    ("mix-name", "POST", "/generate", {"prompt": "hi", "adapters": {"a/b": 1.0}}, 422, "adapters.a/b"),
    ("path-traversal", "POST", "/jobs", job(dataset={"path": "../../etc/passwd"}), 422, "dataset.path"),
    ("path-absolute", "POST", "/jobs", job(dataset={"path": "/etc/passwd"}), 422, "dataset.path"),
    ("path-home", "POST", "/jobs", job(dataset={"path": "~/x.jsonl"}), 422, "dataset.path"),
    ("file-id-traversal", "POST", "/jobs", job(dataset={"file_id": "../x"}), 422, "dataset.file_id"),
    ("base-model-outside", "POST", "/jobs", job(base_model="/etc"), 422, "base_model"),
    ("base-model-dotdot", "POST", "/jobs", job(base_model="../../../"), 422, "base_model"),
    ("trust-remote-code", "POST", "/jobs", job(trust_remote_code=True), 422, "trust_remote_code"),
    ("trust-remote-code-bone", "POST", "/jobs", job(bone={"trust_remote_code": True}), 422, "bone.trust_remote_code"),
    (
        "max-new-tokens",
        "POST",
        "/generate",
        {"prompt": "hi", "max_new_tokens": TEST_LIMITS["max_new_tokens"] + 1},
        422,
        "max_new_tokens",
    ),
    (
        "max-tokens-openai",
        "POST",
        "/v1/completions",
        {"model": "embedded", "prompt": "hi", "max_tokens": TEST_LIMITS["max_new_tokens"] + 1},
        400,
        "max_tokens",
    ),  # OpenAI: 400
    ("adapter-traversal", "POST", "/generate", {"prompt": "hi", "adapter": "../../etc/passwd"}, 404, "adapter"),
]


@pytest.mark.parametrize("method, path, body, status, param", [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_bounds_are_4xx_in_the_envelope(client, method, path, body, status, param):
    reply = client.request(method, path, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param, error
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found")


@pytest.mark.parametrize(
    "path", ["/adapters/..", "/adapters/%2e%2e%2fetc", "/adapters/..%2F..%2Fetc%2Fpasswd", "/adapters/.staging-x"]
)
def test_adapter_paths_cannot_leave_the_registry(client, path):
    for method in ("GET", "DELETE"):
        reply = client.request(method, path)
        assert reply.status_code in (404, 405), reply.text  # never a file outside the registry, never a 500
        assert "error" in reply.json()


def test_body_over_the_limit_is_413_declared_or_streamed(client):
    big = b'{"prompt": "' + b"x" * TEST_LIMITS["max_body_bytes"] + b'"}'
    declared = client.post("/generate", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "payload_too_large"
    assert "BONE_MAX_BODY_BYTES" in declared.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted while the body streams in
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    streamed = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"


def test_uploads_have_their_own_bound(client):
    """Multipart imports may exceed the JSON body bound, up to BONE_MAX_UPLOAD_BYTES."""
    just_over_body = b"\0" * (TEST_LIMITS["max_body_bytes"] + 1024)
    reply = client.post(
        "/adapters",
        data={"name": "up"},
        files={
            "adapter_config": ("adapter_config.json", b"{}"),
            "adapter_model": ("adapter_model.safetensors", just_over_body),
        },
    )
    assert reply.status_code == 422, reply.text  # read and judged (not a safetensors file), not refused for size
    too_big = b"\0" * (SERVER_SETTINGS["max_upload_bytes"] + 1)
    reply = client.post(
        "/adapters",
        data={"name": "up"},
        files={
            "adapter_config": ("adapter_config.json", b"{}"),
            "adapter_model": ("adapter_model.safetensors", too_big),
        },
    )
    assert reply.status_code == 413 and "BONE_MAX_UPLOAD_BYTES" in reply.json()["error"]["message"]


@pytest.mark.parametrize("name", ["Bad", "../x", "a" * 65])
def test_import_names_follow_the_adapter_name_rule(client, name):
    reply = client.post(
        "/adapters",
        data={"name": name},
        files={"adapter_config": ("adapter_config.json", b"{}"), "adapter_model": ("adapter_model.safetensors", b"\0")},
    )
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == "name"
