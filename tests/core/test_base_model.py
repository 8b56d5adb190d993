import pytest

from core.base_model import load_base_model, resolve_base_model
from core.errors import InvalidRequest


def test_embedded_model_is_built_once_and_loaded_with_from_pretrained(settings):
    first = resolve_base_model("embedded", settings)
    assert resolve_base_model("embedded", settings) == first
    loaded = load_base_model("embedded", settings)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.name_or_path == first  # came through from_pretrained on the written folder
    text = "héllo, wörld → 42"
    ids = loaded.tokenizer(text).input_ids
    assert loaded.tokenizer.decode(ids) == text  # byte-level: every string round-trips


def test_embedded_chat_template_ends_turns_with_eos(settings):
    tok = load_base_model("embedded", settings).tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert tok.eos_token_id in ids


def test_local_models_outside_allowed_dirs_are_refused(settings, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="is not available") as refused:
        resolve_base_model(str(outside), settings)
    assert refused.value.code == "base_model_not_allowed"


def test_hub_ids_pass_through(settings):
    assert resolve_base_model("Qwen/Qwen2.5-0.5B-Instruct", settings) == "Qwen/Qwen2.5-0.5B-Instruct"
