"""Two tenants on one real service (`bone-server api` + `worker` processes, real Redis): alice works while bob
sends every hostile input of issue 13's table in a loop. Alice's requests all succeed, her latency stays
within a bound of a quiet run measured in the same test, bob reads nothing of hers, and nothing is lost.

The table's rows each have their own focused test (tests/app/test_*isolation*, named ``test_row<N>_...``);
this one is the whole service under all of them at once."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from core.keys import KeyEntry, generate_key, hash_key

pytestmark = pytest.mark.slow

ALICE, BOB = generate_key(), generate_key()
GREETER = {
    "records": [
        {"prompt": "Q: capital of France?\nA:", "completion": " Paris."},
        {"prompt": "Q: capital of Italy?\nA:", "completion": " Rome."},
    ]
}
EVIL_REGEX = r"model\.layers(?=\.[01]\.)(?:[\w.]|[\w.])*Z" + "x" * 20


def _bob_attacks(alice_job: str, alice_adapter: str) -> list[tuple[str, str, dict]]:
    """(row, method path, request kwargs): each row of the issue's table, as bob would send it."""
    job = {"adapter_name": "bob-evil", "dataset": GREETER, "training": {"max_steps": 2}}
    return [
        ("1 seed overflow", "POST /generate", {"json": {"prompt": "hi", "seed": 2**80, "temperature": 1.0}}),
        ("1 mix weight", "POST /generate", {"json": {"prompt": "hi", "adapters": {alice_adapter: 1e308}}}),
        ("2 dataset path", "POST /jobs", {"json": {**job, "dataset": {"hf_dataset": "data/files"}}}),
        ("2 dataset folder", "POST /jobs", {"json": {**job, "dataset": {"hf_dataset": "files"}}}),
        (
            "3 infinite weight decay",
            "POST /jobs",
            {
                "content": b'{"adapter_name": "bob-inf", "dataset": {"records": [{"text": "a"}]}, '
                b'"training": {"max_steps": 2, "weight_decay": 1e309}}',
                "headers": {"content-type": "application/json"},
            },
        ),
        ("4 regex", "POST /jobs", {"json": {**job, "bone": {"target_modules": EVIL_REGEX}}}),
        ("5 huge prompt", "POST /generate", {"json": {"prompt": "a" * 3_000_000, "max_new_tokens": 1}}),
        ("7 endless job", "POST /jobs", {"json": {**job, "training": {"max_steps": 10**15}}}),
        ("8 compose flood", f"POST /adapters/{alice_adapter}/compose", {"json": {"name": "bob-mix"}}),
        ("9 cursor", f"GET /jobs/{alice_job}/events?after=abc", {}),
        (
            "9 surrogate",
            "POST /generate",
            {"content": b'{"prompt": "\\udfff", "max_new_tokens": 1}', "headers": {"content-type": "application/json"}},
        ),
        ("10 workers", "GET /workers", {}),
        ("11 base model oracle", "POST /jobs", {"json": {**job, "base_model": "data/../../../etc/passwd"}}),
        ("alice's job", f"GET /jobs/{alice_job}", {}),
        ("alice's adapter", f"GET /adapters/{alice_adapter}", {}),
        ("alice's adapter served", "POST /generate", {"json": {"prompt": "hi", "adapter": alice_adapter}}),
        ("alice's job cancelled", f"POST /jobs/{alice_job}/cancel", {}),
    ]


def _alice_round(http: httpx.Client, adapter: str) -> list[float]:
    """One round of alice's everyday work; every answer must be a success."""
    took = []
    for method, path, kwargs in (
        (
            "POST",
            "/generate",
            {
                "json": {
                    "prompt": "Q: capital of France?\nA:",
                    "adapter": adapter,
                    "max_new_tokens": 4,
                    "temperature": 0,
                }
            },
        ),
        ("GET", "/jobs", {}),
        ("GET", "/adapters", {}),
        ("GET", "/healthz", {}),
    ):
        start = time.perf_counter()
        reply = http.request(method, path, **kwargs)
        took.append(time.perf_counter() - start)
        assert reply.status_code == 200, (method, path, reply.status_code, reply.text[:300])
    return took


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.fixture
def two_tenants(service_factory):
    keys = [KeyEntry("alice", "user", hash_key(ALICE)).line(), KeyEntry("bob", "user", hash_key(BOB)).line()]
    return service_factory(BONE_API_KEYS=",".join(keys))


def test_alice_works_while_bob_attacks(two_tenants):
    svc = two_tenants
    alice = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    bob = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {BOB}"}, timeout=60)

    # alice trains an adapter and waits for it
    job = alice.post(
        "/jobs",
        json={
            "adapter_name": "alice-greeter",
            "dataset": GREETER,
            "training": {"max_steps": 30, "learning_rate": 0.01, "batch_size": 2},
        },
    )
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + 300
    while (status := alice.get(f"/jobs/{job_id}").json()["status"]) not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "alice's job did not finish"
        time.sleep(1)
    assert status == "succeeded", alice.get(f"/jobs/{job_id}").json()
    expected = alice.post(
        "/generate",
        json={"prompt": "Q: capital of France?\nA:", "adapter": "alice-greeter", "max_new_tokens": 4, "temperature": 0},
    ).json()["text"]

    quiet = [t for _ in range(15) for t in _alice_round(alice, "alice-greeter")]

    # bob attacks in a loop while alice keeps working
    stop, answers = threading.Event(), []

    def attack():
        while not stop.is_set():
            for row, target, kwargs in _bob_attacks(job_id, "alice-greeter"):
                method, path = target.split(" ", 1)
                try:
                    reply = bob.request(method, path, **kwargs)
                    answers.append((row, reply.status_code, reply.text[:300]))
                except httpx.HTTPError as exc:  # a refused body may close the connection: not a 5xx
                    answers.append((row, 0, repr(exc)))
                if stop.is_set():
                    return

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        noisy = [t for _ in range(15) for t in _alice_round(alice, "alice-greeter")]
    finally:
        stop.set()
        attacker.join(60)

    print(
        f"alice p99 quiet {_p99(quiet) * 1e3:.1f} ms, under attack {_p99(noisy) * 1e3:.1f} ms; bob sent "
        f"{len(answers)}:",
        sorted(Counter((row, status) for row, status, _ in answers).items()),
    )
    # alice: every request succeeded (asserted in each round), and her latency held
    assert _p99(noisy) <= 2 * _p99(quiet) + 0.25, (
        f"alice's p99 {_p99(noisy) * 1e3:.0f} ms under attack vs {_p99(quiet) * 1e3:.0f} ms quiet"
    )
    # bob: no 5xx, nothing of alice's, no job of his accepted from the table
    assert answers, "the attacker sent nothing"
    for row, status, text in answers:
        assert status < 500, (row, status, text)
        if row.startswith("alice's") or row.startswith(("2 ", "3 ", "4 ", "7 ", "11 ")):
            assert status in (0, 400, 403, 404, 409, 413, 422, 429), (row, status, text)
        if row == "10 workers":
            assert job_id not in text, "bob saw alice's job id in /workers"
    assert not any(row.startswith("1 ") and status == 200 for row, status, _ in answers)
    # nothing of alice's lost or changed
    assert alice.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    assert alice.get("/adapters/alice-greeter").status_code == 200
    again = alice.post(
        "/generate",
        json={"prompt": "Q: capital of France?\nA:", "adapter": "alice-greeter", "max_new_tokens": 4, "temperature": 0},
    ).json()["text"]
    assert again == expected
    assert [j["id"] for j in alice.get("/jobs").json()["data"]] == [job_id]
    assert bob.get("/jobs").json()["data"] == []
