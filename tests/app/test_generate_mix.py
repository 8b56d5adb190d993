"""Per-request exact adapter mixes: ``"adapters": {"a": 0.7, "b": 0.3}`` on POST /generate and the OpenAI
routes, served in the same mixed batches as plain adapters, nothing written to the registry.

The reference for a mix is the same sum composed offline (``POST /adapters/{name}/compose``) and served as a
plain adapter: greedy outputs must be identical."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter

# A wide batching window, so concurrent requests reliably land in one batch.
SERVER_SETTINGS = {"batch_wait_ms": 400, "adapter_cache_size": 8}


def gen(client, prompt: str, n: int = 12, **selector) -> dict:
    reply = client.post("/generate", json={"prompt": prompt, "max_new_tokens": n, "temperature": 0, **selector})
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.fixture
def sources(live, client):
    publish_adapter(live.settings, "mx-a", seed=21)
    publish_adapter(live.settings, "mx-b", seed=22, target_modules=("q_proj", "k_proj", "up_proj"))
    return "mx-a", "mx-b"


def test_mix_equals_the_adapter_composed_offline(live, client, sources):
    weights = {"mx-a": 0.7, "mx-b": 0.3}
    made = client.post("/adapters/mx-composed/compose", json={"adapters": weights})
    assert made.status_code == 201, made.text
    names_before = {x["name"] for x in client.get("/adapters").json()["data"]}
    mixed = gen(client, "Mix these two", 16, adapters=weights)
    assert mixed["adapter"] is None and mixed["adapters"] == weights
    assert mixed["text"] == gen(client, "Mix these two", 16, adapter="mx-composed")["text"]
    # the mix does something (texts of a random model are mostly U+FFFD: compare a few prompts)
    prompts = ["Mix these two", "Same prompt", "The quick brown fox"]
    assert [gen(client, p, 16, adapters=weights)["text"] for p in prompts] != [
        gen(client, p, 16, adapter="mx-a")["text"] for p in prompts
    ]
    # the order of the keys does not matter, and nothing was written to the registry
    assert gen(client, "Mix these two", 16, adapters={"mx-b": 0.3, "mx-a": 0.7})["text"] == mixed["text"]
    assert {x["name"] for x in client.get("/adapters").json()["data"]} == names_before
    assert not [n for n in AdapterRegistry(live.settings.registry_dir).list() if n.name.startswith("~")]


def test_weights_one_and_zero_reproduce_the_first_adapter(live, client, sources):
    alone = gen(client, "Just adapter a", 16, adapter="mx-a")["text"]
    assert gen(client, "Just adapter a", 16, adapters={"mx-a": 1.0, "mx-b": 0.0})["text"] == alone


def test_batch_of_plain_adapters_mixes_and_base_rows_answers_each_as_alone(live, client, sources):
    publish_adapter(live.settings, "mx-c", seed=23, r=8)
    requests = [
        ("The quick brown fox", {}, 14),
        ("A", {"adapter": "mx-a"}, 10),
        ("Some medium prompt", {"adapters": {"mx-a": 0.5, "mx-b": 0.5}}, 12),
        ("Tell me more", {"adapter": "mx-c"}, 9),
        ("The quick brown fox", {"adapters": {"mx-a": -0.4, "mx-b": 1.2}}, 11),
    ]
    alone = [gen(client, p, n, **sel) for p, sel, n in requests]
    before = live.engine.scheduler.prefills
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: gen(client, r[0], r[2], **r[1]), requests))
    assert live.engine.scheduler.prefills - before == 1  # one prefill: base, two adapters and two mixes in one batch
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["usage"] for r in together] == [r["usage"] for r in alone]


def test_mix_is_cached_and_refreshed_when_a_source_is_republished(live, client, sources):
    weights = {"mx-a": 0.6, "mx-b": 0.4}
    first = gen(client, "cache me", 12, adapters=weights)["text"]
    installs = live.engine.cache.installs
    assert gen(client, "cache me", 12, adapters=weights)["text"] == first
    assert live.engine.cache.installs == installs  # served from the pool, not rebuilt
    publish_adapter(live.settings, "mx-b", seed=99, overwrite=True, target_modules=("q_proj", "k_proj", "up_proj"))
    client.post("/adapters/mx-ref/compose", json={"adapters": weights})
    assert (
        gen(client, "cache me", 12, adapters=weights)["text"] == gen(client, "cache me", 12, adapter="mx-ref")["text"]
    )


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"adapters": {"mx-a": 0.5, "mx-bat": 0.5}}, 422, "adapters"),  # Bat is not linear in its block
        ({"adapters": {"mx-a": 0.5, "mx-r8": 0.5}}, 422, "adapters"),  # different r
        ({"adapters": {"mx-a": 0.5, "nope": 0.5}}, 404, "adapters"),
        ({"adapters": {"mx-a": 0.5}, "adapter": "mx-a"}, 422, "adapters"),
        ({"adapters": {}}, 422, "adapters"),
        ({"adapters": {"../x": 1.0}}, 422, "adapters"),
    ],
)
def test_mix_errors(live, client, sources, body, status, param):
    publish_adapter(live.settings, "mx-bat", seed=24, init_weights="bat")
    publish_adapter(live.settings, "mx-r8", seed=25, r=8)
    reply = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 4, **body})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"].startswith(param)


def test_openai_routes_take_adapters_as_an_extra_body_field(live, client, sources):
    oai = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    weights = {"mx-a": 0.7, "mx-b": 0.3}
    want = gen(client, "Open mix", 10, adapters=weights)["text"]
    got = oai.completions.create(
        model=live.settings.base_model,
        prompt="Open mix",
        max_tokens=10,
        temperature=0,
        extra_body={"adapters": weights},
    )
    assert got.choices[0].text == want
    chat = oai.chat.completions.create(
        model=live.settings.base_model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        extra_body={"adapters": weights},
    )
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as refused:
        oai.completions.create(model="mx-a", prompt="x", max_tokens=2, extra_body={"adapters": weights})
    assert refused.value.body["param"] == "adapters"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(
            model=live.settings.base_model,
            prompt="x",
            max_tokens=2,
            extra_body={"adapters": {"mx-a": 0.5, "nope": 0.5}},
        )
