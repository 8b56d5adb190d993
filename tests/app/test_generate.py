"""POST /generate over a real server: base and adapters, mixed batches, hot-swap, stale-adapter safety.

References are computed independently: transformers' own greedy ``generate`` on a freshly loaded base
model, with the adapter loaded by ``BoneModel.from_pretrained`` from the registry folder.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import torch

from bone import BoneModel
from core.base_model import load_base_model
from core.registry import WEIGHTS_FILE, AdapterRegistry
from tests.app.conftest import publish_adapter
from tests.app.test_jobs import read_sse

# A wide batching window, so concurrent requests reliably land in one batch.
SERVER_SETTINGS = {"batch_wait_ms": 400, "adapter_cache_size": 3}


def greedy(client, prompt: str, adapter: str | None = None, n: int = 12, **extra) -> dict:
    reply = client.post(
        "/generate", json={"prompt": prompt, "adapter": adapter, "max_new_tokens": n, "temperature": 0, **extra}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def reference(settings, prompt: str, adapter: str | None = None, n: int = 12) -> str:
    """transformers' greedy decoding, one request alone, on a fresh model."""
    loaded = load_base_model("embedded", settings, device=torch.device("cpu"))
    model = loaded.model
    if adapter is not None:
        model = BoneModel.from_pretrained(model, AdapterRegistry(settings.registry_dir).path(adapter))
    ids = torch.tensor([loaded.tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return loaded.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


def test_base_model_greedy_matches_transformers(client, live):
    reply = greedy(client, "Once upon a time", n=16)
    assert reply["adapter"] is None and reply["finish_reason"] in ("length", "stop")
    assert reply["usage"]["prompt_tokens"] == len(b"Once upon a time")  # byte-level tokenizer
    assert reply["usage"]["completion_tokens"] <= 16
    assert reply["text"] == reference(live.settings, "Once upon a time", n=16)


def test_adapter_output_matches_the_adapter_alone(client, live):
    publish_adapter(live.settings, "tuned", seed=3)
    reply = greedy(client, "Once upon a time", "tuned", n=16)
    assert reply["adapter"] == "tuned"
    assert reply["text"] == reference(live.settings, "Once upon a time", "tuned", n=16)
    assert reply["text"] != greedy(client, "Once upon a time", n=16)["text"]  # the adapter does something


def test_mixed_batch_equals_each_request_alone(client, live):
    publish_adapter(live.settings, "ad-a", seed=11)
    publish_adapter(live.settings, "ad-b", seed=12, r=8)
    publish_adapter(live.settings, "ad-bat", seed=13, init_weights="bat")
    requests = [
        ("The quick brown fox", None, 20),
        ("A", "ad-a", 12),
        ("Some medium prompt", "ad-b", 25),
        ("Tell me about Bat", "ad-bat", 16),
        ("The quick brown fox", "ad-a", 9),
    ]
    alone = [greedy(client, p, a, n) for p, a, n in requests]
    outputs = {a: r["text"] for (p, a, _), r in zip(requests[:4], alone[:4])}
    assert len({greedy(client, "Same prompt", a, 12)["text"] for a in (None, "ad-a", "ad-b", "ad-bat")}) == 4, outputs

    before = live.engine.scheduler.prefills
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: greedy(client, *r), requests))
    assert live.engine.scheduler.prefills - before == 1  # one prefill: five rows, four adapters and the base
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["usage"] for r in together] == [r["usage"] for r in alone]
    assert alone[3]["text"] == reference(live.settings, "Tell me about Bat", "ad-bat", 16)


def test_deleted_adapter_is_404_afterwards(client, live):
    publish_adapter(live.settings, "doomed", seed=5)
    greedy(client, "hello", "doomed")
    assert any(key[0] == "doomed" for key in live.engine.cache.slots())
    reply = client.delete("/adapters/doomed")
    assert reply.status_code == 200 and reply.json() == {"id": "doomed", "object": "adapter", "deleted": True}
    gone = client.post("/generate", json={"prompt": "hello", "adapter": "doomed"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "adapter"
    greedy(client, "flush the control queue")  # the eviction runs in the model thread between batches
    assert not any(key[0] == "doomed" for key in live.engine.cache.slots())
    assert client.delete("/adapters/doomed").status_code == 404


def test_republished_adapter_is_served_fresh(client, live):
    first = publish_adapter(live.settings, "evolving", seed=21)
    old = greedy(client, "What changed?", "evolving")["text"]
    second = publish_adapter(live.settings, "evolving", seed=22, overwrite=True)
    assert second.sha256 != first.sha256
    new = greedy(client, "What changed?", "evolving")["text"]
    assert new != old
    assert new == reference(live.settings, "What changed?", "evolving")
    assert [key for key in live.engine.cache.slots() if key[0] == "evolving"] == [("evolving", second.sha256)]


def test_cache_is_bounded_by_count(client, live):
    for i in range(4):
        publish_adapter(live.settings, f"many-{i}", seed=30 + i)
        greedy(client, "hi", f"many-{i}", n=2)
    assert len(live.engine.cache) == live.settings.adapter_cache_size
    assert ("many-0", AdapterRegistry(live.settings.registry_dir).get("many-0").sha256) not in live.engine.cache.slots()
    assert len(live.engine.host.adapter_slots) == live.settings.adapter_cache_size  # evicted = deleted from the model


def test_adapter_of_another_base_model_is_409(client, live):
    publish_adapter(live.settings, "foreign", seed=7, base_model="Qwen/Qwen2.5-0.5B")
    reply = client.post("/generate", json={"prompt": "hi", "adapter": "foreign"})
    assert reply.status_code == 409
    message = reply.json()["error"]["message"]
    assert "Qwen/Qwen2.5-0.5B" in message and "embedded" in message


def test_corrupt_adapter_is_refused_naming_it(client, live):
    info = publish_adapter(live.settings, "rotten", seed=8)
    weights = AdapterRegistry(live.settings.registry_dir).path("rotten") / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    reply = client.post("/generate", json={"prompt": "hi", "adapter": "rotten"})
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert error["code"] == "corrupt_adapter" and "rotten" in error["message"] and info.sha256[:12] in error["message"]
    assert greedy(client, "still serving")["text"] is not None  # the engine lives on


def test_sampling_is_reproducible_with_a_seed(client):
    body = {"prompt": "Random walk", "max_new_tokens": 24, "temperature": 1.0, "top_p": 0.9}
    a = client.post("/generate", json={**body, "seed": 7}).json()["text"]
    b = client.post("/generate", json={**body, "seed": 7}).json()["text"]
    c = client.post("/generate", json={**body, "seed": 8}).json()["text"]
    assert a == b and a != c


def test_stop_string_ends_the_text_before_it(client):
    body = {"prompt": "x", "max_new_tokens": 32, "temperature": 1.0, "seed": 0}  # seeded: the same text twice
    full = client.post("/generate", json=body).json()["text"]
    stop = next(ch for ch in full[2:] if ch.isascii() and ch.isalnum())
    reply = client.post("/generate", json={**body, "stop": ["never appears", stop]}).json()
    assert reply["finish_reason"] == "stop"
    assert reply["text"] == full[: full.index(stop)]


def test_stream_sends_pieces_then_the_response(client):
    body = {"prompt": "Stream this", "max_new_tokens": 20, "temperature": 0}
    whole = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = read_sse(response)
    pieces = [json.loads(d)["text"] for name, d in events if name == "message" and d != "[DONE]"]
    assert "".join(pieces) == whole["text"]
    assert [name for name, _ in events[-2:]] == ["done", "message"] and events[-1][1] == "[DONE]"
    assert json.loads(events[-2][1]) == whole
