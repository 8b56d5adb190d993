"""The base is read straight into its compute dtype, and that changes nothing about what the model computes."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from core.base_model import load_base_model, resolve_base_model
from worker import model_cache


@pytest.fixture
def bf16_model_dir(settings):
    """A tiny Qwen2 saved as bf16 safetensors inside the data dir (so the loader allows it), with a tokenizer."""
    target = settings.data_dir / "tiny-qwen2-bf16"
    config = Qwen2Config(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("embedded", settings))
    tokenizer.save_pretrained(target)
    assert any(target.glob("*.safetensors"))
    return target


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16])
def test_bf16_checkpoint_loads_as_bf16_with_the_same_logits_as_plain_from_pretrained(settings, bf16_model_dir, dtype):
    ours = load_base_model(str(bf16_model_dir), settings, device=torch.device("cpu"), dtype=dtype).model
    plain = AutoModelForCausalLM.from_pretrained(bf16_model_dir, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 5, 9, 42, 100, 7]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, plain(ids).logits)


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process has ``path`` memory-mapped (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == path.resolve():
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_worker_preloads_for_cuda_in_bf16_without_an_fp32_copy(settings, bf16_model_dir):
    """The worker's parent keeps its copy on the CPU but already in the GPU's dtype, read so from disk: every
    parameter is the memory-mapped file itself, not a cast copy of an fp32 load."""
    model_cache.clear()
    try:
        loaded = model_cache.preload(str(bf16_model_dir), settings, torch.device("cuda"))
        assert loaded.device.type == "cpu"
        assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
        ranges = mapped_ranges(bf16_model_dir / "model.safetensors")
        assert ranges
        for name, param in loaded.model.named_parameters():
            assert any(start <= param.data_ptr() < end for start, end in ranges), name
    finally:
        model_cache.clear()
    on_cpu = load_base_model(str(bf16_model_dir), settings, device=torch.device("cpu"))
    assert {p.dtype for p in on_cpu.model.parameters()} == {torch.float32}  # training's CPU default stays fp32
