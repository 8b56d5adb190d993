"""The device-memory estimate of one training process (core/memory_estimate.py), read off a meta-device
skeleton of the embedded base model's architecture and checked against a hand count."""

from __future__ import annotations

import pytest
import torch

from core.jobs import TrainingSpec
from core.memory_estimate import LOSS_CHUNK_TOKENS, device_memory, estimate_device_memory, model_shape

# The embedded model (core/base_model.py): vocabulary 264, hidden 256, MLP 688, 4 layers, 4 heads of 64, 2 KV heads,
# tied embeddings. Per layer: q 256x256 + k 256x128 + v 256x128 + o 256x256 + MLP 3x256x688 + 2 norms of 256.
LAYER = 65536 + 32768 + 32768 + 65536 + 3 * 256 * 688 + 2 * 256  # 725,504
ROOT = 264 * 256 + 256  # embeddings (= the tied output head) and the final norm
BLOCKS = 4 * (8 * 256 + 8 * 128)  # Bone r=8 on q_proj (8 x 256) and v_proj (8 x 128), 4 layers


@pytest.fixture(scope="module")
def shape():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=264,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return model_shape(skeleton)


def test_the_skeleton_is_read_as_counted_by_hand(shape):
    assert (shape.params, shape.root_params, shape.layer_params) == (4 * LAYER + ROOT, ROOT, LAYER)
    assert (shape.layers, shape.hidden_size, shape.vocab_size) == (4, 256, 264)


def test_one_process_matches_a_hand_calculation(shape):
    got = estimate_device_memory(shape, BLOCKS, TrainingSpec(batch_size=4, max_seq_length=512))
    assert got.base == (4 * LAYER + ROOT) * 2  # bf16
    assert got.gathered == 0
    assert got.trainable == BLOCKS * 16  # fp32 weight, gradient, two AdamW moments
    assert got.activations == 34 * 512 * 4 * 256 * 4  # 34 s b h per layer
    assert got.logits == 1024 * 264 * 10  # one chunk of the head's output
    assert got.total == 80_142_848
    assert "about 0.07 GiB per device" in got.describe() and "4 x 512 tokens" in got.describe()


def test_sharding_divides_the_base_and_the_blocks_and_adds_what_is_gathered(shape):
    whole = estimate_device_memory(shape, BLOCKS, TrainingSpec(num_processes=2, per_device_batch_size=2))
    sharded = estimate_device_memory(
        shape, BLOCKS, TrainingSpec(num_processes=2, per_device_batch_size=2, sharding="full")
    )
    assert sharded.shards == 2 and whole.shards == 1
    assert sharded.base * 2 == whole.base and sharded.trainable * 2 == whole.trainable
    assert sharded.gathered == (ROOT + 2 * LAYER) * 2
    assert sharded.activations == whole.activations and sharded.logits == whole.logits
    assert sharded.total < whole.total


@pytest.mark.parametrize(
    "field, values", [("per_device_batch_size", [1, 2, 4, 8]), ("max_seq_length", [64, 256, 1024, 4096])]
)
def test_the_estimate_grows_with_the_batch_and_the_sequence_length(shape, field, values):
    totals = [estimate_device_memory(shape, BLOCKS, TrainingSpec(**{field: v})).total for v in values]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_gradient_checkpointing_keeps_only_each_layers_input_and_one_layer(shape):
    spec = dict(batch_size=4, max_seq_length=512)
    plain = estimate_device_memory(shape, BLOCKS, TrainingSpec(**spec))
    recomputed = estimate_device_memory(shape, BLOCKS, TrainingSpec(gradient_checkpointing=True, **spec))
    assert recomputed.activations == 512 * 4 * 256 * (2 * 4 + 34) < plain.activations


def test_the_logit_chunk_is_the_workers():
    from worker.loss import CHUNK_TOKENS

    assert LOSS_CHUNK_TOKENS == CHUNK_TOKENS


def test_the_device_of_an_advert():
    assert device_memory({"device": "cpu", "memory_bytes": 10**12}) is None  # host memory is no device limit
    assert device_memory({"device": "cuda", "gpu_memory_bytes": [8, 24]}) == 24
    assert device_memory({"device": "cuda:0", "gpu_memory_bytes": [8, 24], "device_memory_bytes": 8}) == 8  # pinned
