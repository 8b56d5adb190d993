"""Bench models shared by every benchmark: small Llama models built deterministically from a config.

``tiny``  = hidden 128, intermediate 352, 2 layers, 4 heads, vocab 512.
``small`` = hidden 512, intermediate 1408, 4 layers, 8 heads (2 kv heads), vocab 8192.
"""

from __future__ import annotations

import torch

BENCH_MODELS = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
}

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(name: str, **overrides):
    from transformers import LlamaConfig

    if name not in BENCH_MODELS:
        raise ValueError(f"unknown bench model {name!r}; choose from {sorted(BENCH_MODELS)}")
    kw = dict(BENCH_MODELS[name], max_position_embeddings=2048, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised ``LlamaForCausalLM`` for bench model ``name``; same seed -> same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(name, **overrides))
    return model.to(dtype).eval()
