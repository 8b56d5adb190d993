"""The clients people already use, unchanged, against a live server on a Bone adapter: LangChain's
``ChatOpenAI`` / ``OpenAI``, litellm's ``openai/`` provider, and lm-evaluation-harness's ``local-completions``
model running a loglikelihood task and a generation task (tests/app/lm_eval_tasks/). Each snippet of the
README's "Use it from ..." section is one of these calls.

Answers are checked against the server's own ``/generate`` (greedy) and, for lm-eval's scores, against a
reference forward of the adapter loaded with ``BoneModel.from_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bone import BoneModel
from core.base_model import resolve_base_model
from core.registry import AdapterRegistry
from tests.app.conftest import publish_adapter

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no fetch of its price list at import
TASKS = Path(__file__).parent / "lm_eval_tasks"
# litellm's and langchain's own pydantic models warn at import; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
ADAPTER = "client-lib"


@pytest.fixture
def adapter(client, live) -> str:
    publish_adapter(live.settings, ADAPTER, seed=21)
    return ADAPTER


def greedy(client, prompt: str, n: int, adapter: str | None = ADAPTER, stop=None) -> dict:
    reply = client.post(
        "/generate", json={"prompt": prompt, "adapter": adapter, "max_new_tokens": n, "temperature": 0, "stop": stop}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


def chat_prompt(live, messages) -> str:
    return live.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- LangChain -------------------------------------------------------------------------------------------
def test_langchain_chat_openai_invoke_stream_and_structured_output(adapter, client, live):
    pytest.importorskip("langchain_openai")
    import openai
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(
        base_url=f"{live.url}/v1", api_key="unused", model=adapter, temperature=0, max_tokens=12, max_retries=0
    )
    expected = greedy(client, chat_prompt(live, [{"role": "user", "content": "Hello there"}]), 12)
    reply = llm.invoke("Hello there")
    assert reply.content == expected["text"]
    assert reply.usage_metadata["input_tokens"] == expected["usage"]["prompt_tokens"]  # counted once
    assert reply.usage_metadata["output_tokens"] == expected["usage"]["completion_tokens"]
    assert "".join(chunk.content for chunk in llm.stream("Hello there")) == expected["text"]

    class Answer(BaseModel):
        text: str

    with pytest.raises(openai.BadRequestError) as refused:  # a clear 400, not a parser error on plain text
        llm.with_structured_output(Answer).invoke("Answer in JSON")
    assert refused.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as tools:
        llm.with_structured_output(Answer, method="function_calling").invoke("Answer in JSON")
    assert tools.value.body["param"] == "tools"


def test_langchain_completions_llm(adapter, client, live):
    pytest.importorskip("langchain_openai")
    from langchain_openai import OpenAI

    llm = OpenAI(
        base_url=f"{live.url}/v1", api_key="unused", model=adapter, temperature=0, max_tokens=10, max_retries=0
    )
    assert llm.invoke("Once upon a time") == greedy(client, "Once upon a time", 10)["text"]


# --- litellm ---------------------------------------------------------------------------------------------
def test_litellm_openai_provider(adapter, client, live):
    litellm = pytest.importorskip("litellm")

    messages = [{"role": "user", "content": "Hi from litellm"}]
    expected = greedy(client, chat_prompt(live, messages), 10)
    reply = litellm.completion(
        model=f"openai/{adapter}",
        api_base=f"{live.url}/v1",
        api_key="unused",
        messages=messages,
        temperature=0,
        max_tokens=10,
        num_retries=0,
    )
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    chunks = litellm.completion(
        model=f"openai/{adapter}",
        api_base=f"{live.url}/v1",
        api_key="unused",
        messages=messages,
        temperature=0,
        max_tokens=10,
        stream=True,
        num_retries=0,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    text = litellm.text_completion(
        model=f"openai/{adapter}",
        api_base=f"{live.url}/v1",
        api_key="unused",
        prompt="Once upon a time",
        temperature=0,
        max_tokens=10,
    )
    assert text.choices[0].text == greedy(client, "Once upon a time", 10)["text"]
    with pytest.raises(litellm.NotFoundError):
        litellm.completion(
            model="openai/no-such-adapter",
            api_base=f"{live.url}/v1",
            api_key="unused",
            messages=messages,
            max_tokens=2,
            num_retries=0,
        )
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(
            model=f"openai/{adapter}",
            api_base=f"{live.url}/v1",
            api_key="unused",
            messages=messages,
            max_tokens=2,
            logit_bias={"65": 3},
            num_retries=0,
        )


# --- lm-evaluation-harness -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_eval_results(live, tmp_path_factory):
    """One lm-eval run of both tiny tasks on the adapter (the server's own tokenizer folder, as a user would
    point lm-eval at ``bone-server models export-embedded``'s output)."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    cache = tmp_path_factory.mktemp("hf-datasets")
    old = {k: os.environ.get(k) for k in ("HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update(HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cwd = os.getcwd()
    os.chdir(TASKS)  # the task YAMLs name their data file relative to themselves
    try:
        publish_lm_eval_adapter(live)
        return simple_evaluate(
            model="local-completions",
            model_args={
                "model": "lm-eval-adapter",
                "base_url": f"{live.url}/v1/completions",
                "tokenizer": resolve_base_model("embedded", live.settings),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "num_concurrent": 1,
                "max_retries": 1,
                "batch_size": 4,
            },
            tasks=["bone_tiny_choice", "bone_tiny_gen"],
            task_manager=TaskManager(include_path=str(TASKS)),
            log_samples=True,
        )
    finally:
        os.chdir(cwd)
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def publish_lm_eval_adapter(live) -> None:
    """The same weights every time (seeded): other tests' ``client`` fixture empties the registry."""
    publish_adapter(live.settings, "lm-eval-adapter", seed=22, overwrite=True)


def test_lm_eval_loglikelihood_task_scores_as_the_adapter_does(lm_eval_results, live):
    results = lm_eval_results
    publish_lm_eval_adapter(live)
    assert "acc,none" in results["results"]["bone_tiny_choice"]
    samples = results["samples"]["bone_tiny_choice"]
    assert len(samples) == 3
    model = BoneModel.from_pretrained(_base(live), AdapterRegistry(live.settings.registry_dir).path("lm-eval-adapter"))
    tokenizer = live.engine.tokenizer
    checked = 0
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            loglikelihood, _ = response[0]
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
            logprobs = torch.log_softmax(logits[len(ctx) - 1 : -1], dim=-1)
            expected = float(logprobs.gather(1, torch.tensor(cont).unsqueeze(1)).sum())
            assert loglikelihood == pytest.approx(expected, abs=1e-3), (context, continuation)
            checked += 1
    assert checked == 8  # every choice of the three questions


def test_lm_eval_generation_task_generates_as_the_adapter_does(lm_eval_results, client, live):
    results = lm_eval_results
    publish_lm_eval_adapter(live)
    assert "exact_match,none" in results["results"]["bone_tiny_gen"]
    samples = results["samples"]["bone_tiny_gen"]
    assert len(samples) == 3
    for sample in samples:
        context = sample["arguments"][0][0]
        expected = greedy(client, context, 8, adapter="lm-eval-adapter", stop=["\n"])["text"]
        assert sample["resps"][0][0] == expected


def _base(live):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_base_model("embedded", live.settings)).eval()
