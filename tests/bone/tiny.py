"""Tiny models built from configs, shared by the bone tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# shared/ sits beside the repo root: <root>/../shared/golden
GOLDEN_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "golden"

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPT_ALL = ["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]


def _llama(hidden=32, inter=48, heads=4, kv=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=48,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    return OPTForCausalLM(cfg)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64))


# name -> (builder, all projection names); "llama-odd" has in_features % 8 != 0 (hidden 36, inter 50)
MODELS = {
    "llama": (_llama, LLAMA_ALL),
    "opt": (_opt, OPT_ALL),
    "gpt2": (_gpt2, GPT2_ALL),
    "llama-odd": (lambda: _llama(hidden=36, inter=50, heads=2, kv=2), LLAMA_ALL),
}

_CACHE: dict[str, torch.nn.Module] = {}


def build(name: str) -> torch.nn.Module:
    """A fresh copy of tiny model ``name`` (deterministic weights, eval mode)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = MODELS[name][0]().eval()
    return copy.deepcopy(_CACHE[name])


def targets(name: str) -> list[str]:
    return list(MODELS[name][1])


def randomize(model, std=0.05, seed=1):
    """Non-zero random blocks (Bat needs small ones so I + B stays invertible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".bone_block." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(batch=3, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 64, (batch, seq), generator=g)
