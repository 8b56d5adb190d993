"""One tenant can never hurt another, generation side (issue 13), over HTTP against a real server with two
real keys: bob sends the inputs of the issue's attack table while alice works, and alice's answers are the
ones she gets alone. Tests are named after the table's rows (1: a poisoned row in a shared batch, 5: a huge
prompt, 9: inputs that used to be 500s) and point 5's per-key share of the generation queue."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from core.access import OwnedAdapters
from core.auth import Principal
from core.keys import KeyEntry, generate_key, hash_key
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter

ALICE, BOB = generate_key(), generate_key()
SERVER_SETTINGS = {
    "api_keys": [KeyEntry("alice", "user", hash_key(ALICE)).line(), KeyEntry("bob", "user", hash_key(BOB)).line()],
    "rate_limit_training": 1000,
    "rate_limit_generation": 10_000,
    "max_batch_size": 4,
    "max_queue": 16,  # a key's share: max(1, 16 // 4) = 4 waiting requests
    "max_new_tokens": 400,
    "max_prompt_tokens": 256,  # a prompt: at most 256 x 16 = 4096 bytes
    "max_body_bytes": 32 * 1024 * 1024,  # the default: the generation routes' own bound is what refuses a big prompt
}
WORK = [
    {"prompt": p, "max_new_tokens": 12, "temperature": 0}
    for p in ("Once upon a time", "Hi", "A somewhat longer prompt than the others", "Bone adapters")
]


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def alice(live, client):
    with live.client(headers=as_(ALICE)) as http:
        yield http


@pytest.fixture
def bob(live, client):
    with live.client(headers=as_(BOB)) as http:
        yield http


def texts(http: httpx.Client, bodies: list[dict]) -> list[str]:
    out = []
    for body in bodies:
        reply = http.post("/generate", json=body)
        assert reply.status_code == 200, reply.text
        out.append(reply.json()["text"])
    return out


def alice_while_bob(live, alice_bodies: list[dict], bob_send, rounds: int = 3) -> tuple[list[list[str]], list]:
    """Alice's requests, ``rounds`` times over, concurrently with bob's loop of ``bob_send(http)``; returns
    alice's texts per round and bob's replies."""
    stop, bob_replies = threading.Event(), []

    def bob_loop():
        with live.client(headers=as_(BOB)) as http:
            while not stop.is_set():
                bob_replies.append(bob_send(http))

    def alice_round(_):
        with live.client(headers=as_(ALICE)) as http:
            with ThreadPoolExecutor(len(alice_bodies)) as pool:
                return list(pool.map(lambda b: http.post("/generate", json=b), alice_bodies))

    attackers = [threading.Thread(target=bob_loop) for _ in range(2)]
    for thread in attackers:
        thread.start()
    try:
        replies = [alice_round(i) for i in range(rounds)]
    finally:
        stop.set()
        for thread in attackers:
            thread.join(60)
    for round_ in replies:
        for reply in round_:
            assert reply.status_code == 200, reply.text
    return [[r.json()["text"] for r in round_] for round_ in replies], bob_replies


def bob_owns(live, name: str, seed: int, transform=None) -> None:
    """An adapter of bob's in the registry; ``transform(tensors)`` alters its weights as stored (what an
    adapter published before imports and jobs were checked may hold)."""
    from safetensors.torch import load_file, save_file

    publish_adapter(live.settings, name, seed=seed)
    registry = AdapterRegistry(live.settings.registry_dir)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "adapter_config.json").write_bytes((registry.path(name) / "adapter_config.json").read_bytes())
        tensors = load_file(str(registry.path(name) / "adapter_model.safetensors"))
        if transform is not None:
            transform(tensors)
        save_file(tensors, str(Path(folder) / "adapter_model.safetensors"))
        info = registry.get(name)
        registry.delete(name)
        OwnedAdapters(registry, Principal("bob", "user", "k")).publish(
            name, Path(folder), {"base_model": info.base_model, "bone": info.bone}
        )


# --- row 1: one row's poison never reaches the batch it shares ------------------------------------------------
def test_row1_seed_overflow_fails_only_its_row(live, alice):
    expected = texts(alice, WORK)

    def bob_send(http):
        return http.post("/generate", json={"prompt": "Hello", "max_new_tokens": 8, "temperature": 1.0, "seed": 2**80})

    rounds, bob_replies = alice_while_bob(live, WORK, bob_send)
    assert rounds == [expected] * len(rounds)
    assert bob_replies and {r.status_code for r in bob_replies} == {422}
    assert {r.json()["error"]["param"] for r in bob_replies} == {"seed"}


def test_row1_nan_adapter_fails_only_its_row(live, alice, bob):
    bob_owns(live, "bob-nan", seed=3, transform=lambda t: t[sorted(t)[0]].fill_(float("nan")))
    expected = texts(alice, WORK)

    def bob_send(http):
        return http.post(
            "/generate",
            json={"adapter": "bob-nan", "prompt": "Hello", "max_new_tokens": 8, "temperature": 1.0, "seed": 1},
        )

    rounds, bob_replies = alice_while_bob(live, WORK, bob_send)
    assert rounds == [expected] * len(rounds)
    assert bob_replies and {r.status_code for r in bob_replies} == {500}
    error = bob_replies[0].json()["error"]
    assert error["code"] == "non_finite_adapter" and "bone_block" in error["message"] and error["param"] == "adapter"


@pytest.mark.parametrize("weight, says", [(1e308, "|w| <= 100"), (-101, "|w| <= 100"), ("1e309", "finite")])
def test_row1_mix_weights_are_bounded(live, bob, weight, says):
    bob_owns(live, "bob-a", seed=4)
    raw = f'{{"prompt": "Hello", "adapters": {{"bob-a": {weight}}}}}'
    reply = bob.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"].startswith("adapters") and says in error["message"]
    assert (
        bob.post("/generate", json={"prompt": "Hello", "adapters": {"bob-a": 100}, "max_new_tokens": 2}).status_code
        == 200
    )


def test_row1_imported_weights_must_be_finite(live, bob):
    publish_adapter(live.settings, "source", seed=5)
    registry = AdapterRegistry(live.settings.registry_dir)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(registry.path("source") / "adapter_model.safetensors"))
    key = sorted(tensors)[1]
    tensors[key][0, 0] = float("inf")
    with tempfile.TemporaryDirectory() as folder:
        save_file(tensors, str(Path(folder) / "w.safetensors"))
        reply = bob.post(
            "/adapters",
            data={"name": "bob-inf"},
            files={
                "adapter_config": (
                    "adapter_config.json",
                    (registry.path("source") / "adapter_config.json").read_bytes(),
                ),
                "adapter_model": ("adapter_model.safetensors", (Path(folder) / "w.safetensors").read_bytes()),
            },
        )
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["param"] == "adapter_model" and error["code"] == "non_finite_weights" and key in error["message"]
    assert bob.get("/adapters/bob-inf").status_code == 404


def test_row1_a_composed_sum_must_be_finite(live, bob):
    huge = lambda t: [v.fill_(3e38) for v in t.values()]  # noqa: E731 - finite, at float32's edge
    bob_owns(live, "bob-big-1", seed=6, transform=huge)
    bob_owns(live, "bob-big-2", seed=7, transform=huge)
    reply = bob.post("/adapters/bob-sum/compose", json={"adapters": {"bob-big-1": 1.0, "bob-big-2": 1.0}})
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["code"] == "non_finite_weights" and "bone_block" in error["message"]
    mixed = bob.post("/generate", json={"prompt": "Hi", "adapters": {"bob-big-1": 1.0, "bob-big-2": 1.0}})
    assert mixed.status_code == 422 and mixed.json()["error"]["code"] == "non_finite_weights"


# --- row 5: a huge prompt never stalls the event loop ---------------------------------------------------------
def healthz_latencies_while(live, action) -> tuple[list[float], object]:
    """/healthz round trips (seconds) measured every 10 ms while ``action()`` runs in a thread."""
    result, done = {}, threading.Event()

    def run():
        try:
            result["value"] = action()
        finally:
            done.set()

    latencies = []
    with live.client() as probe:
        probe.get("/healthz")  # connection open before the clock starts
        thread = threading.Thread(target=run)
        thread.start()
        while not done.is_set() or len(latencies) < 5:
            started = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        thread.join()
    return latencies, result.get("value")


@pytest.mark.parametrize("chunked", [False, True])
def test_row5_a_30mb_prompt_is_refused_without_stalling_the_loop(live, bob, chunked):
    prompt = "x" * (30 * 1024 * 1024)
    body = f'{{"prompt": "{prompt}", "max_new_tokens": 4}}'.encode()

    def send():
        content = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)) if chunked else body
        try:
            return bob.post("/generate", content=content, headers={"content-type": "application/json"})
        except httpx.TransportError as exc:  # the server may answer 413 and close before the upload ends
            return exc

    latencies, reply = healthz_latencies_while(live, send)
    if isinstance(reply, httpx.Response):
        assert reply.status_code == 413, reply.text
        assert reply.json()["error"]["param"] == "prompt"
    p99 = sorted(latencies)[max(0, int(len(latencies) * 0.99) - 1)]
    print(
        f"\n/healthz while a 30 MB prompt is sent ({'chunked' if chunked else 'Content-Length'}): "
        f"{len(latencies)} probes, median {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )
    assert max(latencies) < 1.0  # was 94 s; the figure itself is reported, not asserted tightly (shared CPUs)


def test_row5_a_prompt_over_its_byte_bound_is_refused_before_tokenizing(live, bob):
    """Under the body bound but over BONE_MAX_PROMPT_TOKENS x 16 bytes: 422 naming prompt, and the tokenizer
    never sees it."""
    calls = []
    engine = live.engine
    original = engine.tokenize
    engine.tokenize = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        reply = bob.post("/generate", json={"prompt": "é" * 2049, "max_new_tokens": 2})  # 4098 bytes, 2049 chars
        chat = bob.post(
            "/v1/chat/completions",
            json={"model": "embedded", "messages": [{"role": "user", "content": "z" * 5000}], "max_tokens": 2},
        )
    finally:
        engine.tokenize = original
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "prompt"
    assert (
        reply.json()["error"]["code"] == "prompt_too_long"
        and "BONE_MAX_PROMPT_TOKENS" in reply.json()["error"]["message"]
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"  # /v1: OpenAI's 400
    assert calls == []


# --- row 9: inputs that used to answer 500 --------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/generate", '{"prompt": "a\\udfffb"}', "prompt"),
        ("/generate", '{"prompt": "ab", "stop": ["\\udfff"]}', "stop"),
        ("/generate", '{"prompt": "ab", "seed": 18446744073709551616}', "seed"),
        ("/generate", '{"prompt": "ab", "seed": 100000000000000000000000000}', "seed"),
        ("/generate", '{"prompt": "ab", "seed": -1}', "seed"),
        ("/generate", '{"prompt": "ab", "temperature": NaN}', "temperature"),
        ("/generate", '{"prompt": "ab", "top_p": 1e309}', "top_p"),
        ("/v1/completions", '{"model": "embedded", "prompt": "a\\udfffb"}', "prompt"),
        ("/v1/completions", '{"model": "embedded", "prompt": "ab", "seed": 18446744073709551616}', "seed"),
        (
            "/v1/chat/completions",
            '{"model": "embedded", "messages": [{"role": "user", "content": "a\\udfffb"}]}',
            "messages",
        ),
        (
            "/v1/chat/completions",
            '{"model": "embedded", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udfffb"}]}]}',
            "messages",
        ),
        (
            "/v1/chat/completions",
            '{"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "seed": 9223372036854775808}',
            "seed",
        ),
        (
            "/v1/chat/completions",
            '{"model": "embedded", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1e999}',
            "presence_penalty",
        ),
    ],
)
def test_row9_bad_generation_inputs_are_422_naming_the_field(live, bob, path, body, param):
    reply = bob.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == (422 if path == "/generate" else 400), reply.text  # /v1 answers as OpenAI does
    assert reply.json()["error"]["param"].startswith(param), reply.json()


@pytest.mark.parametrize(
    "after", ["abc", "1-2-3", "-1", "99999999999999999999-0", "1-18446744073709551616", "1" * 30, "\u0661\u0662-0"]
)
def test_row9_a_malformed_events_cursor_is_422(live, bob, after):
    job = bob.post("/jobs", json={"adapter_name": "cursor-job", "dataset": {"records": [{"text": "hi"}]}})
    assert job.status_code == 202, job.text
    url = f"/jobs/{job.json()['id']}/events"
    reply = bob.get(url, params={"after": after})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == "after"
    if after.isascii():  # (a header is latin-1)
        header = bob.get(url, params={"stream": "true"}, headers={"Last-Event-ID": after})
        assert header.status_code == 422 and header.json()["error"]["param"] == "Last-Event-ID"
    assert bob.get(url, params={"after": "0-0"}).status_code == 200
    assert bob.get(url, params={"after": "1700000000000-5"}).status_code == 200


@pytest.mark.parametrize("path, named", [("/jobs", True), ("/evals", True), ("/adapters", False), ("/files", False)])
def test_row9_other_cursors_never_answer_500(live, bob, path, named):
    """Listing cursors: an id that is not one of the caller's answers 4xx naming ``after`` (jobs, evaluations);
    adapter names page by order, so any string is a position; files take no cursor."""
    for after in ("abc", "\x00", "9" * 40, "../../etc", "\u0661"):
        reply = bob.get(path, params={"after": after})
        assert reply.status_code < 500, (path, after, reply.text)
        if named:
            assert reply.status_code in (404, 422) and reply.json()["error"]["param"] == "after"


# --- point 5: one key's share of the generation queue ---------------------------------------------------------
def test_one_key_cannot_take_the_whole_generation_queue(live, client):
    """Bob fills the 4 batch slots and his share (4) of the 16 waiting places; his next request is a 429 naming
    the quota, while alice still gets in, and ahead of bob's waiting ones."""
    engine = live.engine
    alice = live.client(headers=as_(ALICE), timeout=300)  # two rounds of long rows on a busy machine
    bob = live.client(headers=as_(BOB), timeout=300)
    long = {"prompt": "Tell me everything", "max_new_tokens": 250, "temperature": 0}
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(bob.post, "/generate", json=long) for _ in range(4)]
        deadline = time.monotonic() + 30
        while len(engine.batch.rows) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        futures += [pool.submit(bob.post, "/generate", json=long) for _ in range(4)]
        while engine.pending < 4:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        refused = bob.post("/generate", json={"prompt": "one more", "max_new_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert (
            refused.json()["error"]["code"] == "key_queue_full"
            and "BONE_MAX_QUEUE_PER_KEY" in refused.json()["error"]["message"]
        )
        assert int(refused.headers["retry-after"]) >= 1
        started = time.monotonic()
        mine = alice.post("/generate", json={"prompt": "Hi", "max_new_tokens": 4, "temperature": 0})
        alice_waited = time.monotonic() - started
        assert mine.status_code == 200, mine.text
        bob_done = [f.result(120) for f in futures]
    alice.close()
    bob.close()
    assert [r.status_code for r in bob_done] == [200] * 8
    # alice's request took the first free slot, ahead of bob's two waiting ones: it finished before them
    assert alice_waited < max(r.elapsed.total_seconds() for r in bob_done)


@pytest.mark.parametrize(
    "body",
    [
        {"adapter_name": "nul", "dataset": {"path": "a\x00b.jsonl"}},
        {"adapter_name": "nul", "dataset": {"hf_dataset": "a\x00b"}},
        {"adapter_name": "nul", "dataset": {"records": [{"text": "hi"}]}, "base_model": "a\x00b"},
    ],
)
def test_row9_a_nul_byte_in_a_path_is_never_a_500(live, bob, body):
    """(The fuzzer's find: a NUL byte reached the file system, which refuses it with a ValueError.) Whether a
    hub-style name is accepted at all is the datasets rule's business (issue 13 point 3); never a 500."""
    reply = bob.post("/jobs", json=body)
    assert reply.status_code < 500, reply.text
    if "hf_dataset" not in body["dataset"]:
        assert reply.status_code == 422
