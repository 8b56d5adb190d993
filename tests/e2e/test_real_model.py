"""examples/real-model.md, checked with a model of another architecture than the embedded Llama: a tiny Qwen2
config saved with save_pretrained and a ChatML tokenizer, served from a local folder (BONE_BASE_MODEL), then
trained with the walkthrough's job body as written on examples/chat.jsonl, and chatted with."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Service, running

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
WALKTHROUGH = ROOT / "examples" / "real-model.md"

# Qwen2's ChatML, as its tokenizer_config.json writes it (without Qwen's default system prompt).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2(target: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from core.base_model import _byte_level_tokenizer

    tokenizer = _byte_level_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"}
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def job_body_of_the_walkthrough() -> dict:
    bodies = re.findall(r"^```json\n(.*?)^```", WALKTHROUGH.read_text(), re.S | re.M)
    assert len(bodies) == 1, "real-model.md shows one job body"
    return json.loads(bodies[0])


@pytest.fixture
def qwen2_service(tmp_path, redis_url):
    data_dir = tmp_path / "bone-data"
    model_dir = build_tiny_qwen2(data_dir / "models" / "tiny-qwen2")  # inside the data dir: allowed
    svc = Service(data_dir, redis_url, tmp_path)
    svc.env["BONE_BASE_MODEL"] = str(model_dir)
    with running(svc):
        yield svc


def test_the_real_model_walkthrough_on_a_local_qwen2(qwen2_service):
    svc = qwen2_service
    http = httpx.Client(base_url=svc.url, timeout=60)
    models = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [str(svc.data_dir / "models" / "tiny-qwen2")]

    with open(ROOT / "examples" / "chat.jsonl", "rb") as handle:
        uploaded = http.post("/files", files={"file": ("chat.jsonl", handle)}).json()
    body = job_body_of_the_walkthrough()
    body["dataset"] = {"file_id": uploaded["id"]}
    created = http.post("/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    job = created.json()
    for _ in range(600):
        job = http.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert job["status"] == "succeeded", job.get("error") or svc.logs()
    assert job["metrics"]["epochs"] == body["training"]["epochs"]  # exactly the passes asked for

    adapter = http.get(f"/adapters/{body['adapter_name']}").json()
    assert sorted(adapter["bone"]["target_modules"]) == sorted(body["bone"]["target_modules"])
    assert adapter["bone"]["r"] == body["bone"]["r"]

    # The rows went through the model's chat template; the chat route applies it too.
    events = http.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    assert any("6 messages" in e["message"] for e in events)
    messages = [{"role": "user", "content": "who are you?"}]
    chat = http.post(
        "/v1/chat/completions",
        json={"model": body["adapter_name"], "messages": messages, "max_tokens": 8, "temperature": 0},
    )
    assert chat.status_code == 200, chat.text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(svc.data_dir / "models" / "tiny-qwen2")
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    rendered = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    assert chat.json()["usage"]["prompt_tokens"] == len(rendered)
