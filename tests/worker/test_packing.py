"""Packing done right: whole examples in blocks, positions restarting at 0 per example and no attention across
examples (transformers' flattening convention: position_ids, no 2-D mask). Every packed example's logits must
equal the same example run alone within 1e-5 (fp32), with eager and sdpa attention, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from worker.batches import collate, trainable_tokens
from worker.data import IGNORE_INDEX, Example, pack
from worker.train import example_targets

VOCAB = 97


def tiny_llama(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def examples(lengths: list[int]) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return out


def test_pack_keeps_whole_examples_and_every_target():
    exs = examples([5, 9, 3, 12, 7, 4, 11])
    blocks = pack(exs, 16, seed=0)
    assert all(len(b.input_ids) <= 16 and sum(b.segments) == len(b.input_ids) for b in blocks)
    assert sorted(n for b in blocks for n in b.segments) == sorted(len(e.input_ids) for e in exs)
    assert sum(example_targets(b) for b in blocks) == sum(example_targets(e) for e in exs)
    batch = collate(blocks, pad_id=0, device=torch.device("cpu"))
    assert batch["attention_mask"] is None and trainable_tokens(batch) == sum(example_targets(e) for e in exs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_packed_example_computes_what_it_computes_alone(attn):
    model = tiny_llama(attn)
    exs = examples([5, 9, 3, 12, 7, 4, 11, 2])
    blocks = pack(exs, 20, seed=0)
    assert any(len(b.segments) > 1 for b in blocks) and len({len(b.input_ids) for b in blocks}) > 1  # padding too
    batch = collate(blocks, pad_id=0, device=torch.device("cpu"))
    with torch.no_grad():
        # use_cache=False as in training: transformers reads packing from position_ids only without a cache
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
        ).logits
        checked = 0
        for row, block in enumerate(blocks):
            start = 0
            for n in block.segments:
                alone = model(input_ids=torch.tensor([block.input_ids[start : start + n]])).logits[0]
                torch.testing.assert_close(packed[row, start : start + n], alone, rtol=0, atol=1e-5)
                start, checked = start + n, checked + 1
        assert checked == len(exs)
        # what packing did before (positions running on, attention across examples) is far off: the test can fail
        naive = model(input_ids=batch["input_ids"]).logits
        first = blocks[0].segments[0]
        assert (
            naive[0, first : first + blocks[0].segments[1]] - packed[0, first : first + blocks[0].segments[1]]
        ).abs().max() > 1e-2


def test_the_packed_training_loss_is_the_sum_of_the_examples_losses(base):
    import copy

    from bone import BoneConfig, get_bone_model
    from worker.loss import CausalLMLoss

    model = CausalLMLoss(get_bone_model(copy.deepcopy(base.model), BoneConfig(r=8)))
    exs = examples([5, 9, 3, 12, 7, 4, 11, 2])
    cpu = torch.device("cpu")
    with torch.no_grad():
        packed = model(**collate(pack(exs, 24, seed=1), pad_id=0, device=cpu))
        alone = sum(model(**collate([e], pad_id=0, device=cpu)) for e in exs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=0)
