"""The engine at scale: the batch bound defaults from the device and is shown in /metrics, each decode step's
time is reported by batch size (labels bounded to powers of two), and the model thread's detokenizing never
waits on the request handlers' tokenizer."""

from __future__ import annotations

import re
import threading

import httpx
import torch

from app.engine import GenerationRequest, Target
from app.engine.batch import SamplingParams
from app.engine.engine import default_max_batch_size
from app.metrics import step_rows_label


def scrape(client: httpx.Client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.text


def step_count(text: str, rows: str) -> float:
    found = re.search(rf'^bone_engine_step_seconds_count{{rows="{re.escape(rows)}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_the_batch_bound_defaults_from_the_device_and_is_shown(live, client):
    assert default_max_batch_size(torch.device("cuda")) == 64
    assert default_max_batch_size(torch.device("cpu")) == 16
    assert live.settings.max_batch_size is None  # unset: the engine resolves it
    assert live.engine.max_batch_size == live.engine.settings.max_batch_size == 16  # the tests serve on CPU
    text = scrape(client)
    assert re.search(r"^bone_engine_max_batch_size 16\.0$", text, re.M)
    # the KV budget's default is what 16 rows of the longest prompt and answer hold, and it is shown too
    budget = 16 * (live.settings.max_prompt_tokens + live.settings.max_new_tokens)
    assert live.engine.kv_budget_tokens == budget
    assert re.search(rf"^bone_engine_kv_budget_tokens {budget}\.0$", text, re.M)
    assert re.search(r"^bone_engine_kv_tokens_reserved \S+$", text, re.M)


def test_step_time_is_reported_by_batch_size(live, client):
    before = scrape(client)
    steps = live.engine.scheduler.steps
    body = {"prompt": "Once upon a time", "max_new_tokens": 6, "temperature": 0}
    assert client.post("/generate", json=body).status_code == 200
    alone = live.engine.scheduler.steps - steps
    middle = scrape(client)
    assert alone >= 1 and step_count(middle, "1") - step_count(before, "1") == alone

    # four requests at once are prefilled together (batch_wait_ms), then decode as a batch of four
    prompts = ["Once upon a time", "A somewhat longer prompt", "Bone adapters", "The weather today"]
    replies: list[httpx.Response] = []
    threads = [
        threading.Thread(
            target=lambda p=p: replies.append(
                client.post("/generate", json={"prompt": p, "max_new_tokens": 8, "temperature": 0})
            )
        )
        for p in prompts
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in replies] == [200] * 4
    after = scrape(client)
    assert step_count(after, "4") > step_count(middle, "4")
    labels = set(re.findall(r'^bone_engine_step_seconds_count{rows="([^"]+)"}', after, re.M))
    assert labels <= {"1", "2", "4", "8", "16", "32", "64+"}


def test_rows_labels_are_powers_of_two():
    assert [step_rows_label(n) for n in (0, 1, 2, 3, 4, 7, 8, 15, 16, 33, 63, 64, 65, 1000)] == [
        "1",
        "1",
        "2",
        "2",
        "4",
        "4",
        "8",
        "8",
        "16",
        "32",
        "32",
        "64+",
        "64+",
        "64+",
    ]


def test_the_model_thread_does_not_wait_on_the_handlers_tokenizer(make_engine):
    engine = make_engine(max_batch_size=2)
    ids = engine.tokenize("Once upon a time")
    streamed: list[str] = []
    with engine._tokenizer_lock:  # a handler tokenizing a long prompt, for as long as the generation takes
        request = engine.submit(
            GenerationRequest(Target(None, None), ids, SamplingParams(max_new_tokens=12, temperature=0)),
            on_text=streamed.append,
        )
        result = request.future.result(60)
    assert result.completion_tokens >= 1 and result.text.startswith("".join(streamed))
    assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
