"""POST /files, GET /files, DELETE /files/{id} over HTTP, and jobs that use an uploaded file."""

from __future__ import annotations

import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SERVER_SETTINGS = {"max_upload_bytes": 8192}
ROWS = [
    {"prompt": "2+2=", "completion": "4"},
    {"text": "plain"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]},
]


@pytest.fixture
def files(client, live):
    shutil.rmtree(live.settings.files_dir, ignore_errors=True)
    return client


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def parquet(rows) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def upload(client, name, content, **data):
    return client.post("/files", files={"file": (name, content)}, data=data)


@pytest.mark.parametrize(
    "name, content, formats",
    [
        ("train.jsonl", jsonl(ROWS), {"prompt_completion": 1, "text": 1, "messages": 1}),
        ("train.json", json.dumps(ROWS[:2]).encode(), {"prompt_completion": 1, "text": 1}),
        ("train.csv", b"prompt,completion\n2+2=,4\n3+3=,6\n", {"prompt_completion": 2}),
        ("train.parquet", parquet(ROWS[2:] * 3), {"messages": 3}),
    ],
)
def test_upload_list_get_delete(files, live, name, content, formats):
    reply = upload(files, name, content)
    assert reply.status_code == 201, reply.text
    info = reply.json()
    assert info["id"].startswith("file-") and info["filename"] == name and info["bytes"] == len(content)
    assert info["formats"] == formats and info["rows"] == sum(formats.values())
    assert info["format"] == (next(iter(formats)) if len(formats) == 1 else "mixed")
    stored = live.settings.files_dir / (info["id"] + "." + name.rsplit(".", 1)[1])
    assert stored.read_bytes() == content  # kept as uploaded, next to a sidecar
    assert (live.settings.files_dir / f"{info['id']}.meta.json").is_file()

    assert [f["id"] for f in files.get("/files").json()["data"]] == [info["id"]]
    assert files.get(f"/files/{info['id']}").json() == info
    assert files.delete(f"/files/{info['id']}").json() == {"id": info["id"], "object": "file", "deleted": True}
    assert files.get("/files").json()["data"] == [] and not stored.exists()
    assert files.delete(f"/files/{info['id']}").status_code == 404


def test_bad_rows_are_reported_by_number_and_the_file_is_not_kept(files, live):
    lines = [{"text": "ok"}, {"txt": "typo"}, {"prompt": "no completion"}, {"text": "ok"}]
    content = jsonl(lines) + b"{broken json\n" + jsonl([{"messages": [{"role": "user", "content": "x"}]}])
    reply = upload(files, "bad.jsonl", content)
    assert reply.status_code == 422
    error = reply.json()["error"]
    assert error["code"] == "invalid_file" and error["param"] == "file"
    assert error["message"].startswith("4 of 6 rows are invalid; first: row 1 (line 2): missing field 'text'")
    assert [(e["row"], e["line"]) for e in error["errors"]] == [(1, 2), (2, 3), (4, 5), (5, 6)]
    assert "missing field 'completion'" in error["errors"][1]["message"]
    assert "not valid JSON" in error["errors"][2]["message"]
    assert "no assistant turn" in error["errors"][3]["message"]
    assert files.get("/files").json()["data"] == []
    assert list(live.settings.files_dir.iterdir()) == []  # no staging leftovers


def test_only_the_first_bad_rows_are_listed(files):
    reply = upload(files, "many.jsonl", jsonl([{"nope": i} for i in range(50)]))
    error = reply.json()["error"]
    assert error["message"].startswith("50 of 50 rows are invalid") and len(error["errors"]) == 10


@pytest.mark.parametrize(
    "name, content, data, message",
    [
        ("train.txt", b"hello", {}, "must end in one of"),
        ("empty.jsonl", b"\n\n", {}, "has no rows"),
        ("train.jsonl", jsonl([{"text": "t"}]), {"format": "messages"}, "field 'messages' must be a non-empty list"),
        ("train.jsonl", jsonl([{"text": "t"}]), {"format": "chat"}, "format must be one of"),
    ],
)
def test_unusable_uploads_are_422(files, name, content, data, message):
    reply = upload(files, name, content, **data)
    assert reply.status_code == 422 and message in reply.json()["error"]["message"], reply.text


def test_an_upload_over_the_limit_is_413(files, live):
    reply = upload(files, "big.jsonl", jsonl([{"text": "x" * 100}] * 100))
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "payload_too_large"
    assert files.get("/files").json()["data"] == []


def test_a_job_on_an_uploaded_file_and_a_validation_file(files, live):
    train = upload(files, "train.jsonl", jsonl(ROWS)).json()
    held = upload(files, "held.jsonl", jsonl(ROWS[:1])).json()
    reply = files.post(
        "/jobs",
        json={
            "adapter_name": "from-file",
            "dataset": {"file_id": train["id"]},
            "validation_dataset": {"file_id": held["id"], "format": "prompt_completion"},
            "training": {"eval_every": 5},
        },
    )
    assert reply.status_code == 202, reply.text
    job = reply.json()
    assert job["dataset"] == {"file_id": train["id"]}
    assert job["validation_dataset"] == {"file_id": held["id"], "format": "prompt_completion"}

    missing = files.post("/jobs", json={"adapter_name": "x", "dataset": {"file_id": "file-nothere"}})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "dataset.file_id"
    assert missing.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "content",
    [
        "\ufeffprompt,completion\n2+2=,4\n3+3=,6\n".encode("utf-8"),  # Excel's "CSV UTF-8", pandas' utf-8-sig
        "\ufeffprompt,completion\r\n2+2=,4\r\n3+3=,6\r\n".encode("utf-8"),
    ],
)
def test_a_csv_with_a_byte_order_mark_reads_like_one_without(files, live, content):
    from core.files import read_rows

    reply = upload(files, "excel.csv", content)
    assert reply.status_code == 201, reply.text
    info = reply.json()
    assert info["formats"] == {"prompt_completion": 2}
    rows = read_rows(live.settings.files_dir / f"{info['id']}.csv")  # what the worker trains on
    assert rows[0] == {"prompt": "2+2=", "completion": "4"}  # no "\ufeffprompt" column


def test_a_jsonl_with_a_byte_order_mark_is_read(files):
    reply = upload(files, "bom.jsonl", b"\xef\xbb\xbf" + jsonl(ROWS[:2]))
    assert reply.status_code == 201, reply.text
    assert reply.json()["rows"] == 2


@pytest.mark.parametrize("fmt, ok", [("prompt_completion", True), ("text", False), ("messages", False)])
def test_a_format_override_is_checked_against_the_uploaded_file(files, fmt, ok):
    train = upload(files, "pc.jsonl", jsonl([ROWS[0]] * 3)).json()
    reply = files.post(
        "/jobs",
        json={"adapter_name": f"fmt-{fmt.replace('_', '-')}", "dataset": {"file_id": train["id"], "format": fmt}},
    )
    if ok:
        assert reply.status_code == 202, reply.text
        return
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == "dataset.format" and error["code"] == "format_mismatch"
    assert "row 0" in error["message"] and fmt in error["message"]


def test_a_format_override_is_checked_against_a_mixed_file_and_a_path(files, live):
    mixed = upload(files, "mixed.jsonl", jsonl(ROWS)).json()
    reply = files.post(
        "/jobs",
        json={
            "adapter_name": "fmt-mixed",
            "dataset": {"file_id": mixed["id"], "format": "text"},
            "validation_dataset": {"file_id": mixed["id"]},
        },
    )
    assert reply.status_code == 422 and "row 0" in reply.json()["error"]["message"], reply.text
    live.settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    (live.settings.datasets_dir / "fmt.jsonl").write_bytes(jsonl([ROWS[1]] * 2))
    good = files.post("/jobs", json={"adapter_name": "fmt-path", "dataset": {"path": "fmt.jsonl", "format": "text"}})
    assert good.status_code == 202, good.text
    bad = files.post(
        "/jobs",
        json={
            "adapter_name": "fmt-path2",
            "dataset": {"path": "fmt.jsonl", "format": "messages"},
            "validation_dataset": {"records": [{"text": "x"}]},
        },
    )
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "dataset.format", bad.text
    held = files.post(
        "/jobs",
        json={
            "adapter_name": "fmt-held",
            "dataset": {"path": "fmt.jsonl"},
            "validation_dataset": {"file_id": mixed["id"], "format": "messages"},
        },
    )
    assert held.status_code == 422 and held.json()["error"]["param"] == "validation_dataset.format", held.text
