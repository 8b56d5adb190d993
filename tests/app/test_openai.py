"""The OpenAI-compatible routes, driven by the official ``openai`` client pointed at the running app."""

from __future__ import annotations

import openai
import pytest

from tests.app.conftest import publish_adapter


@pytest.fixture
def oai(client, live) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=60) as api:
        yield api


def greedy_generate(client, prompt: str, adapter: str | None, n: int) -> dict:
    reply = client.post("/generate", json={"prompt": prompt, "adapter": adapter, "max_new_tokens": n, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_models_lists_the_base_and_every_adapter(oai, live):
    publish_adapter(live.settings, "oai-a", seed=1)
    publish_adapter(live.settings, "oai-b", seed=2)
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {"embedded", "oai-a", "oai-b"}
    assert models["oai-a"].parent == "embedded" and models["oai-b"].parent == "embedded"
    assert all(m.object == "model" for m in models.values())


def test_completion_equals_generate_and_streams_the_same_text(oai, client, live):
    publish_adapter(live.settings, "oai-c", seed=3)
    for model, adapter in (("embedded", None), ("oai-c", "oai-c")):
        expected = greedy_generate(client, "Once upon a time", adapter, 10)
        reply = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
        assert reply.object == "text_completion" and reply.model == model
        assert reply.choices[0].text == expected["text"]
        assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert reply.usage.completion_tokens == expected["usage"]["completion_tokens"]
        chunks = list(
            oai.completions.create(
                model=model,
                prompt="Once upon a time",
                max_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_chat_uses_the_template_and_streams_the_same_text(oai, client, live):
    publish_adapter(live.settings, "oai-chat", seed=4)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    prompt = live.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = greedy_generate(client, prompt, "oai-chat", 12)
    reply = oai.chat.completions.create(model="oai-chat", messages=messages, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    stream = oai.chat.completions.create(model="oai-chat", messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_several_prompts_and_choices(oai):
    reply = oai.completions.create(model="embedded", prompt=["a", "b"], n=2, max_tokens=4, temperature=1.0, seed=5)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    again = oai.completions.create(model="embedded", prompt=["a", "b"], n=2, max_tokens=4, temperature=1.0, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]


def test_errors_come_back_as_openai_errors(oai, live):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert missing.value.body["param"] == "model" and missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        oai.chat.completions.create(
            model="embedded", messages=[{"role": "user", "content": "hi"}], max_tokens=live.settings.max_new_tokens + 1
        )
    assert too_many.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as unsupported:
        oai.completions.create(model="embedded", prompt="hi", max_tokens=2, logit_bias={"65": 5})
    assert unsupported.value.body["param"] == "logit_bias"
