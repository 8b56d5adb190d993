"""What OpenAI's own client expects beyond the basics (tests/app/test_openai.py): ``models.retrieve``, 400 and
OpenAI's error types on /v1, usage counted once with ``n``, token-id prompts, ``logprobs`` / ``echo``,
``top_p: 0``, and fields the server cannot honour refused by name. Driven by the official ``openai`` client
(sync, async, streaming) against a live server."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch

from core.base_model import resolve_base_model
from tests.app.conftest import publish_adapter


@pytest.fixture
def oai(client, live) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=60) as api:
        yield api


@pytest.fixture(scope="module")
def reference_model(live):
    """A separate copy of the base model, to compute log-probabilities the server must report."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_base_model("embedded", live.settings), dtype=torch.float32)
    return model.eval()


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def test_models_retrieve_names_the_base_and_adapters(oai, live):
    publish_adapter(live.settings, "ret-a", seed=1)
    base = oai.models.retrieve("embedded")
    assert base.id == "embedded" and base.object == "model"
    adapter = oai.models.retrieve("ret-a")
    assert adapter.id == "ret-a" and adapter.owned_by
    for missing in ("no-such-model", "Not A Valid Name", "org/model"):
        with pytest.raises(openai.NotFoundError) as refused:
            oai.models.retrieve(missing)
        assert refused.value.body["type"] == "invalid_request_error"
        assert refused.value.body["code"] == "model_not_found" and refused.value.body["param"] == "model"


BAD_BODIES = [  # (path, body, param): each is a 400 on /v1, as OpenAI and vLLM answer
    ("/v1/completions", {"model": "embedded", "prompt": "hi", "temperature": 3}, "temperature"),
    ("/v1/completions", {"model": "embedded", "prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": "embedded"}, "prompt"),
    ("/v1/completions", {"model": "embedded", "prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 needs echo
    ("/v1/completions", {"model": "embedded", "prompt": [5, 99999]}, "prompt"),  # outside the vocabulary
    ("/v1/completions", {"model": "embedded", "prompt": [[5], []]}, "prompt"),
    ("/v1/chat/completions", {"model": "embedded", "messages": []}, "messages"),
    (
        "/v1/chat/completions",
        {"model": "embedded", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
    ),  # needs logprobs: true
]


@pytest.mark.parametrize("path, body, param", BAD_BODIES)
def test_invalid_requests_are_400_on_v1(client, path, body, param):
    reply = client.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_malformed_json_is_400_on_v1_and_native_routes_keep_422(client):
    broken = b'{"model": "embedded", "prompt": '
    reply = client.post("/v1/completions", content=broken, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json", reply.text
    native = client.post("/generate", content=broken, headers={"Content-Type": "application/json"})
    assert native.status_code == 422 and native.json()["error"]["code"] == "invalid_json", native.text
    assert client.post("/generate", json={"prompt": "hi", "temperature": 3}).status_code == 422


def test_unknown_v1_route_is_an_invalid_request_404(client):
    reply = client.get("/v1/no-such-thing")
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "invalid_request_error"


UNSUPPORTED = [  # (field, value): OpenAI defines them; this server cannot honour them, so it says so
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
    ("logit_bias", {"65": 10}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("function_call", "auto"),
    ("presence_penalty", 0.5),
    ("frequency_penalty", 0.5),
]


@pytest.mark.parametrize("field, value", UNSUPPORTED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(UNSUPPORTED)])
def test_fields_that_cannot_be_honoured_are_refused_by_name(oai, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model="embedded", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={field: value}
        )
    assert refused.value.body["param"] == field and refused.value.body["code"] == "unsupported_parameter"
    assert field.split("_")[0] in refused.value.body["message"]


def test_neutral_values_of_those_fields_are_accepted(oai):
    reply = oai.chat.completions.create(
        model="embedded",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        response_format={"type": "text"},
        logit_bias={},
        tool_choice="none",
        presence_penalty=0,
        frequency_penalty=0,
    )
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as suffix:
        oai.completions.create(model="embedded", prompt="hi", max_tokens=2, suffix="end")
    assert suffix.value.body["param"] == "suffix"


def test_usage_counts_the_prompt_once_whatever_n(oai, live):
    single = oai.completions.create(model="embedded", prompt="Count me once", max_tokens=3, temperature=0)
    several = oai.completions.create(model="embedded", prompt="Count me once", max_tokens=3, temperature=0, n=3)
    assert several.usage.prompt_tokens == single.usage.prompt_tokens == len(live.engine.tokenize("Count me once"))
    assert several.usage.completion_tokens == sum(3 for _ in several.choices)
    chat = [{"role": "user", "content": "hi"}]
    one = oai.chat.completions.create(model="embedded", messages=chat, max_tokens=2, temperature=0)
    two = oai.chat.completions.create(model="embedded", messages=chat, max_tokens=2, temperature=0, n=2)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    stream = list(
        oai.chat.completions.create(
            model="embedded",
            messages=chat,
            max_tokens=2,
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[-1].usage.prompt_tokens == one.usage.prompt_tokens


def test_token_id_prompts_equal_their_text(oai, live):
    publish_adapter(live.settings, "ids-a", seed=2)
    ids = live.engine.tokenize("Token ids in")
    other = live.engine.tokenize("and another")
    text = oai.completions.create(model="ids-a", prompt="Token ids in", max_tokens=6, temperature=0)
    one = oai.completions.create(model="ids-a", prompt=ids, max_tokens=6, temperature=0)
    both = oai.completions.create(model="ids-a", prompt=[ids, other], max_tokens=6, temperature=0)
    assert one.choices[0].text == text.choices[0].text == both.choices[0].text
    assert one.usage.prompt_tokens == len(ids) and both.usage.prompt_tokens == len(ids) + len(other)
    alone = oai.completions.create(model="ids-a", prompt="and another", max_tokens=6, temperature=0)
    assert both.choices[1].text == alone.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(oai, live, reference_model):
    ids = live.engine.tokenize("The cat sat on the mat")
    expected = reference_logprobs(reference_model, ids)
    reply = oai.completions.create(model="embedded", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = reply.choices[0]
    assert choice.text == "The cat sat on the mat" and reply.usage.completion_tokens == 0
    assert choice.logprobs.tokens == [live.engine.detokenize([i]) for i in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    got = torch.tensor(choice.logprobs.token_logprobs[1:])
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    assert choice.logprobs.text_offset == [i for i in range(len(ids))]  # one byte per token here
    for token_lp, top in zip(choice.logprobs.token_logprobs[1:], choice.logprobs.top_logprobs[1:]):
        assert len(top) == 1 and max(top.values()) >= token_lp - 1e-6
    # lm-eval's default: max_tokens=1 (the generated token comes after the prompt's)
    scored = oai.completions.create(model="embedded", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = scored.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[:-1] == choice.logprobs.token_logprobs
    assert max(lp.top_logprobs[-1].values()) == lp.token_logprobs[-1]  # greedy: the chosen one is the top one


def test_generated_logprobs_follow_the_chosen_tokens(oai, live):
    publish_adapter(live.settings, "lp-a", seed=3)
    reply = oai.completions.create(model="lp-a", prompt="Hello", max_tokens=8, temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens).startswith(reply.choices[0].text) and len(lp.tokens) == reply.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and math.isclose(max(top.values()), chosen, abs_tol=1e-6)  # greedy
        assert chosen <= 0
    chat = oai.chat.completions.create(
        model="lp-a",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(chat.choices[0].message.content)
    for item in content:
        assert len(item.top_logprobs) == 2 and math.isclose(item.top_logprobs[0].logprob, item.logprob, abs_tol=1e-6)
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    plain = oai.chat.completions.create(
        model="lp-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0
    )
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as streamed:
        oai.completions.create(model="lp-a", prompt="Hello", max_tokens=2, logprobs=1, stream=True)
    assert streamed.value.body["param"] == "logprobs"


def test_top_p_zero_is_greedy(oai):
    greedy = oai.completions.create(model="embedded", prompt="Zero nucleus", max_tokens=8, temperature=0)
    for seed in (1, 2):
        sampled = oai.completions.create(
            model="embedded", prompt="Zero nucleus", max_tokens=8, temperature=1.0, top_p=0, seed=seed
        )
        assert sampled.choices[0].text == greedy.choices[0].text


def test_echo_streams_the_prompt_first(oai):
    chunks = list(
        oai.completions.create(model="embedded", prompt="Echo me", max_tokens=4, temperature=0, echo=True, stream=True)
    )
    whole = oai.completions.create(model="embedded", prompt="Echo me", max_tokens=4, temperature=0, echo=True)
    assert chunks[0].choices[0].text == "Echo me"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_async_client_gets_the_same_answers(oai, live):
    async def ask() -> tuple[str, str, str]:
        async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=60) as api:
            completion, chat = await asyncio.gather(
                api.completions.create(model="embedded", prompt="Async", max_tokens=5, temperature=0),
                api.chat.completions.create(
                    model="embedded", messages=[{"role": "user", "content": "Async"}], max_tokens=5, temperature=0
                ),
            )
            pieces = []
            async for chunk in await api.chat.completions.create(
                model="embedded",
                messages=[{"role": "user", "content": "Async"}],
                max_tokens=5,
                temperature=0,
                stream=True,
            ):
                pieces.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            with pytest.raises(openai.BadRequestError):
                await api.chat.completions.create(
                    model="embedded",
                    messages=[{"role": "user", "content": "x"}],
                    response_format={"type": "json_object"},
                )
            return completion.choices[0].text, chat.choices[0].message.content, "".join(pieces)

    completion, chat, streamed = asyncio.run(ask())
    assert (
        completion
        == oai.completions.create(model="embedded", prompt="Async", max_tokens=5, temperature=0).choices[0].text
    )
    assert streamed == chat
