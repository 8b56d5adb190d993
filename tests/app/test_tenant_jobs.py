"""One tenant can never hurt another (issue 13), the jobs / datasets / quotas half, over HTTP against a live
server with three keys: bob attacks, alice works, root is the operator. Each test is named after the row of
the issue's table it covers; rows 2, 6 and 7 are also checked on a real worker in tests/worker/test_tenant_jobs.py.
No worker runs here: jobs stay queued, which is all these checks need."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest

from core.files import FileStore
from core.fleet import advertise
from core.keys import KeyEntry, generate_key, hash_key
from tests.app.test_auth import publish_as

ALICE, BOB, ROOT = generate_key(), generate_key(), generate_key()
SERVER_SETTINGS = {
    "api_keys": [
        KeyEntry("alice", "user", hash_key(ALICE)).line(),
        KeyEntry("bob", "user", hash_key(BOB)).line(),
        KeyEntry("root", "admin", hash_key(ROOT)).line(),
    ],
    "rate_limit_training": 12,
    "max_active_jobs_per_owner": 3,
    "max_file_bytes_per_owner": 100,
    "max_adapters_per_owner": 3,
    "max_train_steps": 1000,
    "max_inline_records": 50,
}
RECORDS = [{"prompt": "2+2=", "completion": "4"}]
# The row-4 pattern: catastrophic backtracking in Python's re (20 s at 40 characters).
EVIL = r"model\.layers(?=\.[01]\.)(?:[\w.]|[\w.])*Z"
# The same blow-up without look-around: RE2 accepts it and matches in linear time.
EVIL_RE2 = r"model\.layers\.[01]\.(?:[\w.]|[\w.])*Z"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def job_body(name: str, **fields) -> dict:
    return {"adapter_name": name, "dataset": {"records": RECORDS}, **fields}


def post_job(client: httpx.Client, key: str, name: str, **fields) -> httpx.Response:
    return client.post("/jobs", headers=bearer(key), json=job_body(name, **fields))


def error_of(reply: httpx.Response) -> dict:
    return reply.json()["error"]


# --- row 2: datasets stay in their folder -----------------------------------------------------------------------
# Names of the hub's shape ("name", "namespace/name") are looked up in the datasets folder only (and refused with
# one message when absent there: hub datasets are off); any other shape fails the schema's pattern first.
@pytest.mark.parametrize(
    "name, code",
    [
        ("files", "dataset_not_allowed"),
        ("data/files", "dataset_not_allowed"),
        ("nobody/hub-set", "dataset_not_allowed"),
        ("../files", "invalid_value"),
        ("datasets/../files", "invalid_value"),
        ("/etc", "invalid_value"),
        ("a/b/c", "invalid_value"),
    ],
)
def test_row2_hf_dataset_cannot_name_a_folder_outside_the_datasets_dir(live, client, name, code):
    alice_upload = client.post("/files", headers=bearer(ALICE), files={"file": ("rows.jsonl", b'{"text": "a"}\n')})
    assert alice_upload.status_code == 201, alice_upload.text
    reply = client.post(
        "/jobs", headers=bearer(BOB), json={"adapter_name": "bob-steals", "dataset": {"hf_dataset": name}}
    )
    assert reply.status_code == 422, reply.text
    error = error_of(reply)
    assert error["param"] == "dataset.hf_dataset" and error["code"] == code, error
    assert str(live.settings.data_dir) not in error["message"]  # no server path in the answer


# --- row 3: non-finite numbers never get in; one bad record never takes a listing down --------------------------
@pytest.mark.parametrize(
    "field, raw",
    [("weight_decay", "1e309"), ("learning_rate", "NaN"), ("max_grad_norm", "Infinity"), ("epochs", "-Infinity")],
)
def test_row3_infinite_numbers_are_refused_naming_the_field(client, field, raw):
    body = f'{{"adapter_name": "x", "dataset": {{"records": [{{"text": "a"}}]}}, "training": {{"{field}": {raw}}}}}'
    reply = client.post("/jobs", headers={**bearer(BOB), "Content-Type": "application/json"}, content=body)
    assert reply.status_code == 422, reply.text
    assert error_of(reply)["param"] == f"training.{field}"


def test_row3_infinite_weight_decay_does_not_break_listing(client, redis_conn, caplog):
    alices = post_job(client, ALICE, "alice-works").json()
    bobs = post_job(client, BOB, "bob-breaks").json()
    # A record as an older server stored it (it accepted 1e309): it no longer validates.
    key = f"bone:job:{bobs['id']}"
    raw = redis_conn.get(key).decode()
    assert '"weight_decay":0.0' in raw
    redis_conn.set(key, raw.replace('"weight_decay":0.0', '"weight_decay":1e309'))

    with caplog.at_level(logging.WARNING, logger="core.jobstore"):
        listing = client.get("/jobs", headers=bearer(ALICE))
        assert listing.status_code == 200, listing.text
        assert [j["id"] for j in listing.json()["data"]] == [alices["id"]]
        # alice's listing read alice's records only: bob's broken one was never even fetched
        assert not [r for r in caplog.records if bobs["id"] in r.getMessage()]
        for key_ in (BOB, ROOT):
            listing = client.get("/jobs", headers=bearer(key_))
            assert listing.status_code == 200, listing.text
            assert bobs["id"] not in [j["id"] for j in listing.json()["data"]]
        assert [r for r in caplog.records if bobs["id"] in r.getMessage() and "skipping" in r.getMessage()]
    assert [j["id"] for j in client.get("/jobs", headers=bearer(ROOT)).json()["data"]] == [alices["id"]]
    one = client.get(f"/jobs/{bobs['id']}", headers=bearer(BOB))
    assert one.status_code == 500 and error_of(one)["code"] == "unreadable_record"  # the envelope, no traceback
    assert client.get(f"/jobs/{bobs['id']}", headers=bearer(ALICE)).status_code == 404  # as for any other's id


def test_row3_a_broken_evaluation_record_does_not_break_eval_listing(live, client, redis_conn):
    publish_as(live, "bob", "bob-scored", seed=3)
    publish_as(live, "alice", "alice-scored", seed=4)
    bobs = client.post(
        "/evals", headers=bearer(BOB), json={"adapters": ["bob-scored"], "dataset": {"records": RECORDS}}
    )
    alices = client.post(
        "/evals", headers=bearer(ALICE), json={"adapters": ["alice-scored"], "dataset": {"records": RECORDS}}
    )
    assert bobs.status_code == alices.status_code == 202, (bobs.text, alices.text)
    key = f"bone:eval:{bobs.json()['id']}"
    redis_conn.set(key, redis_conn.get(key).decode().replace('"max_examples":1000', '"max_examples":"many"'))
    for key_, expected in ((ALICE, [alices.json()["id"]]), (BOB, []), (ROOT, [alices.json()["id"]])):
        listing = client.get("/evals", headers=bearer(key_))
        assert listing.status_code == 200, listing.text
        assert [e["id"] for e in listing.json()["data"]] == expected


def test_row3_long_file_names_and_eval_names_are_refused(client):
    upload = client.post("/files", headers=bearer(BOB), files={"file": ("x" * 300 + ".jsonl", b'{"text": "a"}\n')})
    assert upload.status_code == 422 and error_of(upload)["param"] == "file", upload.text
    evaluation = client.post(
        "/evals", headers=bearer(BOB), json={"adapters": ["a" * 100], "dataset": {"records": RECORDS}}
    )
    assert evaluation.status_code == 422 and error_of(evaluation)["param"].startswith("adapters"), evaluation.text


def test_row3_long_strings_and_huge_seeds_are_refused(client):
    for fields, param in (
        ({"base_model": "x" * 5000}, "base_model"),
        ({"queue": "q" * 1000}, "queue"),
        ({"training": {"seed": 2**64}}, "training.seed"),
        ({"bone": {"target_modules": "a" * 5000}}, "bone.target_modules"),
        ({"bone": {"target_modules": ["q" * 1000]}}, "bone.target_modules"),
    ):
        reply = post_job(client, BOB, "long", **fields)
        assert reply.status_code == 422, (fields, reply.text)
        assert error_of(reply)["param"].startswith(param), (param, reply.text)


# --- row 4: a module regex cannot freeze the API ----------------------------------------------------------------
def healthz_while(live, action) -> tuple[float, object]:
    """Run ``action`` in a thread while polling /healthz; return (the slowest /healthz in s, the action's result)."""
    result: dict = {}

    def run():
        result["value"] = action()

    thread = threading.Thread(target=run)
    slowest = 0.0
    with httpx.Client(base_url=live.url, timeout=30) as probe:
        thread.start()
        while thread.is_alive():
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.01)
    thread.join()
    return slowest, result["value"]


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_row4_backtracking_target_modules_regex_answers_promptly(live, client, field):
    # refused outright (look-around is not RE2); accepted by RE2 and matched in linear time (it matches no
    # module: a target pattern then matches nothing, 422; an exclude pattern excludes nothing, 202)
    expected = {EVIL: 422, EVIL_RE2: 422 if field == "target_modules" else 202}
    for pattern, status in expected.items():
        pattern += "." * 200
        bone = (
            {"target_modules": pattern}
            if field == "target_modules"
            else {"target_modules": "all-linear", field: pattern}
        )
        started = time.perf_counter()
        slowest, reply = healthz_while(live, lambda: post_job(client, BOB, "evil", bone=bone))  # noqa: B023 - called now
        took = time.perf_counter() - started
        assert reply.status_code == status, reply.text
        if status == 422:
            assert error_of(reply)["param"] == f"bone.{field}", reply.text
        assert took < 5, f"{pattern[:40]!r}: {took:.1f} s"
        assert slowest < 1.0, f"/healthz took {slowest:.2f} s while {pattern[:40]!r} was checked"


def test_row4_backtracking_regex_in_an_imported_adapter_config_answers_promptly(live, client):
    config = json.dumps({"peft_type": "BONE", "r": 4, "target_modules": EVIL + "." * 200}).encode()
    started = time.perf_counter()
    slowest, reply = healthz_while(
        live,
        lambda: client.post(
            "/adapters",
            headers=bearer(BOB),
            data={"name": "evil-import"},
            files={
                "adapter_config": ("adapter_config.json", config),
                "adapter_model": ("adapter_model.safetensors", b"x"),
            },
        ),
    )
    assert reply.status_code == 422, reply.text
    assert error_of(reply)["param"] == "adapter_config" and "RE2" in error_of(reply)["message"]
    assert time.perf_counter() - started < 5 and slowest < 1.0


def test_row4_healthz_stays_fast_while_backtracking_patterns_are_sent(live, client):
    """Ten row-4 requests back to back (both shapes) while /healthz is probed; its p99 stays far below the
    seconds one such request used to freeze the whole API for (bound generous: 2 shared CPUs in CI)."""
    latencies: list[float] = []
    done = threading.Event()

    def attack():
        try:
            for i in range(10):
                pattern = (EVIL if i % 2 else EVIL_RE2) + "." * 200
                assert post_job(client, ROOT, "evil", bone={"target_modules": pattern}).status_code == 422
        finally:
            done.set()

    thread = threading.Thread(target=attack)
    with httpx.Client(base_url=live.url, timeout=30) as probe:
        thread.start()
        while not done.is_set() or len(latencies) < 20:
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
    thread.join()
    latencies.sort()
    assert latencies[int(0.99 * (len(latencies) - 1))] < 0.25, latencies[-5:]


def test_row4_a_plain_regex_still_targets_modules(client):
    reply = post_job(client, ALICE, "regex-ok", bone={"target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"})
    assert reply.status_code == 202, reply.text


# --- row 6: inline records are bounded in time; quotas bound what one owner holds ------------------------------
def test_row6_inline_records_carry_a_ttl_and_go_when_the_job_ends(live, client, redis_conn):
    job = post_job(client, BOB, "bob-records", validation_dataset={"records": RECORDS}).json()
    keys = [f"bone:job:{job['id']}:records", f"bone:job:{job['id']}:validation_records"]
    for key in keys:
        assert 0 < redis_conn.ttl(key) <= live.settings.inline_records_ttl_s
    assert client.post(f"/jobs/{job['id']}/cancel", headers=bearer(BOB)).json()["status"] == "cancelled"
    assert redis_conn.exists(*keys) == 0


def test_row6_active_jobs_quota_is_429_naming_it(live, client):
    ids = [post_job(client, BOB, f"bob-{i}").json()["id"] for i in range(3)]
    over = post_job(client, BOB, "bob-3")
    assert over.status_code == 429, over.text
    error = error_of(over)
    assert error["code"] == "quota_exceeded" and error["param"] == "quota.active_jobs"
    assert "BONE_MAX_ACTIVE_JOBS_PER_OWNER" in error["message"]
    assert post_job(client, ALICE, "alice-unaffected").status_code == 202  # bob's quota is bob's alone
    client.post(f"/jobs/{ids[0]}/cancel", headers=bearer(BOB))  # an ended job frees its slot
    assert post_job(client, BOB, "bob-4").status_code == 202


def test_row6_concurrent_jobs_never_pass_the_active_quota_together(live, client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        with live.client() as http:
            return post_job(http, BOB, f"bob-race-{i}").status_code

    with ThreadPoolExecutor(6) as pool:
        codes = sorted(pool.map(one, range(6)))
    assert codes == [202] * 3 + [429] * 3, codes
    assert len(client.get("/jobs", headers=bearer(BOB)).json()["data"]) == 3


def test_row6_file_bytes_quota_is_429_and_keeps_nothing(live, client):
    store = FileStore(live.settings.files_dir)
    for info in store.list():  # earlier tests' uploads count against the same owners
        store.delete(info.id)
    small = client.post("/files", headers=bearer(BOB), files={"file": ("a.jsonl", b'{"text": "' + b"a" * 40 + b'"}\n')})
    assert small.status_code == 201, small.text
    big = client.post("/files", headers=bearer(BOB), files={"file": ("b.jsonl", b'{"text": "' + b"b" * 60 + b'"}\n')})
    assert big.status_code == 429, big.text
    assert error_of(big)["param"] == "quota.file_bytes"
    assert [f["id"] for f in client.get("/files", headers=bearer(BOB)).json()["data"]] == [small.json()["id"]]
    assert (
        client.post("/files", headers=bearer(ALICE), files={"file": ("c.jsonl", b'{"text": "c"}\n')}).status_code == 201
    )


def test_row6_adapters_quota_is_429_for_jobs_and_compose(live, client):
    for i in range(3):
        publish_as(live, "bob", f"bob-a{i}", seed=i)
    job = post_job(client, BOB, "bob-a3")
    assert job.status_code == 429 and error_of(job)["param"] == "quota.adapters", job.text
    compose = client.post("/adapters/bob-sum/compose", headers=bearer(BOB), json={"adapters": {"bob-a0": 1.0}})
    assert compose.status_code == 429 and error_of(compose)["param"] == "quota.adapters", compose.text
    imported = client.post(
        "/adapters",
        headers=bearer(BOB),
        data={"name": "bob-imported"},
        files={"adapter_config": ("adapter_config.json", b"{}"), "adapter_model": ("adapter_model.safetensors", b"x")},
    )
    assert imported.status_code == 429 and error_of(imported)["param"] == "quota.adapters", imported.text
    assert post_job(client, BOB, "bob-a0", overwrite=True).status_code == 202  # replacing one's own adds nothing


# --- row 7: a job's size is bounded by settings -----------------------------------------------------------------
@pytest.mark.parametrize(
    "training, param",
    [
        ({"max_steps": 10**15}, "training.max_steps"),
        ({"max_steps": 1001}, "training.max_steps"),
        ({"max_steps": 1000, "batch_size": 1024, "gradient_accumulation_steps": 1024}, "training.max_steps"),
        ({"epochs": 1e6}, "training.epochs"),
    ],
)
def test_row7_unbounded_max_steps_is_refused(client, training, param):
    reply = post_job(client, BOB, "bob-forever", training=training)
    assert reply.status_code == 422, reply.text
    assert error_of(reply)["param"] == param


# --- row 8: compose is rate-limited like training -----------------------------------------------------------------
def test_row8_compose_flood_is_rate_limited(live, client):
    publish_as(live, "bob", "bob-src", seed=1)
    # One target name, overwritten: the flood adds no adapter, so what stops it is the rate limit, not a quota.
    replies = [
        client.post(
            "/adapters/bob-sum/compose", headers=bearer(BOB), json={"adapters": {"bob-src": 0.5}, "overwrite": True}
        )
        for _ in range(15)
    ]
    codes = [r.status_code for r in replies]
    limit = live.settings.rate_limit_training
    assert codes[:limit] == [201] * limit and set(codes[limit:]) == {429}, codes
    assert error_of(replies[-1])["code"] == "rate_limited" and "Retry-After" in replies[-1].headers
    # the bucket is bob's: alice composes meanwhile
    publish_as(live, "alice", "alice-src", seed=2)
    assert (
        client.post(
            "/adapters/alice-sum/compose", headers=bearer(ALICE), json={"adapters": {"alice-src": 1.0}}
        ).status_code
        == 201
    )


# --- row 10: /workers is owner-scoped for users -------------------------------------------------------------------
def test_row10_workers_hide_other_owners_job_ids(client, redis_conn):
    alices = post_job(client, ALICE, "alice-running").json()["id"]
    advertise(redis_conn, "w1", {"device": "cpu", "queues": ["bone-training"]}, ttl_s=60)
    redis_conn.hset("rq:worker:w1", mapping={"current_job": alices, "state": "busy"})

    def current(key: str):
        reply = client.get("/workers", headers=bearer(key))
        assert reply.status_code == 200, reply.text
        (worker,) = reply.json()["data"]
        return worker["current_job"], worker["state"]

    assert current(BOB) == (None, "busy")
    assert current(ALICE) == (alices, "busy")
    assert current(ROOT) == (alices, "busy")


# --- row 11: no file-existence oracle through base_model ----------------------------------------------------------
def test_row11_base_model_paths_answer_the_same_whether_or_not_they_exist(live, client):
    existing = ["data/../../../etc/passwd", "/etc", "../" * 8 + "etc/hostname", str(live.settings.data_dir)]
    missing = [
        "data/../../../no/such/file",
        "/no/such/dir",
        "../" * 8 + "no/such",
        str(live.settings.data_dir / "nope"),
    ]
    messages = set()
    for name in existing + missing:
        reply = post_job(client, BOB, "bob-probe", base_model=name)
        assert reply.status_code == 422, (name, reply.text)
        error = error_of(reply)
        assert error["param"] == "base_model" and error["code"] == "base_model_not_allowed", (name, error)
        messages.add(error["message"].replace(repr(name), "NAME"))
    assert len(messages) == 1, messages
