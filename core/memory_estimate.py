"""How much device memory one training process of a job needs, estimated before the job is queued.

POST /jobs builds the base model's *meta-device skeleton* (shapes, no weights; app/job_checks.py) and this
module turns it and the job's training settings into bytes per device:

    base          every base parameter in the worker's compute dtype (bf16 on CUDA), / shards
    gathered      sharded only: what FSDP holds whole while it runs: the root unit (embeddings, final norm,
                  output head, for the whole forward and backward) and two decoder layers (the one running and
                  the one prefetched)
    trainable     the Bone blocks (and any modules_to_save / trained biases) in fp32 x 4: the weights, their
                  gradients and AdamW's two moments, / shards (FSDP shards them too)
    activations   what backward needs from forward, per decoder layer: 34 * s * b * h bytes with 16-bit
                  activations and no recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation
                  in Large Transformer Models", eq. 1: s*b*h*(34 + 5*a*s/h)). The 5*a*s^2*b term is the stored
                  attention-score matrix, which the SDPA flash / memory-efficient kernels never materialise, so
                  it is left out. With gradient checkpointing only each layer's input is kept (2*s*b*h) plus one
                  layer's full activations while it is recomputed.
    logits        the loss's output head runs in chunks of ``LOSS_CHUNK_TOKENS`` target positions
                  (worker/loss.py), so at most one chunk of logits exists: bf16 head output, its fp32 copy and
                  that copy's gradient = 10 bytes per (token, vocabulary entry)

b is the per-device micro-batch (batch_size / (num_nodes x num_processes)), s is max_seq_length, h the hidden size.
It leaves out the CUDA context, the allocator's fragmentation and kernels' workspaces, so a job it admits can
still run out of memory; a job it refuses would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from core.jobs import TrainingSpec

LOSS_CHUNK_TOKENS = 1024  # worker.loss.CHUNK_TOKENS (the API does not import the worker; a test keeps them equal)
ACTIVATION_BYTES_PER_LAYER_ELEMENT = 34  # Korthikanti et al. 2022, 16-bit, per s*b*h, attention scores excluded
CHECKPOINTED_BYTES_PER_LAYER_ELEMENT = 2  # gradient checkpointing keeps each layer's bf16 input
LOGIT_BYTES_PER_ELEMENT = 2 + 4 + 4  # bf16 head output, fp32 logits, fp32 gradient of the logits
TRAINABLE_BYTES_PER_PARAM = 4 * 4  # fp32 weight, gradient, AdamW exp_avg, exp_avg_sq
GATHERED_LAYERS = 2  # FSDP: the running layer and the prefetched next one
GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a base model, read off its skeleton."""

    params: int  # every parameter (tied ones once)
    root_params: int  # parameters outside the decoder layers: embeddings, final norm, output head
    layer_params: int  # the largest decoder layer
    layers: int
    hidden_size: int
    vocab_size: int


def decoder_layers(model: Any) -> list[Any]:
    """The decoder's repeated blocks: the ``ModuleList`` holding the most parameters (``model.layers`` in
    Llama/Qwen/Mistral, ``transformer.h`` in GPT-2); works on a Bone-wrapped model too."""
    import torch

    best: list[Any] = []
    best_size = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def model_shape(skeleton: Any) -> ModelShape:
    """Read a (meta-device) causal LM skeleton."""
    config = skeleton.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = next((getattr(text, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(text, k, None)), 0)
    head = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    vocab = int(head.weight.shape[0]) if head is not None else int(getattr(text, "vocab_size", 0) or 0)
    layers = decoder_layers(skeleton)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    every = list(skeleton.parameters())  # shared (tied) parameters appear once
    return ModelShape(
        params=sum(p.numel() for p in every),
        root_params=sum(p.numel() for p in every if id(p) not in in_layers),
        layer_params=max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0),
        layers=len(layers),
        hidden_size=int(hidden),
        vocab_size=vocab,
    )


@dataclass(frozen=True)
class DeviceMemoryEstimate:
    shards: int
    base: int
    gathered: int
    trainable: int
    activations: int
    logits: int
    micro_batch: int  # examples per device per micro-batch
    seq_length: int

    @property
    def total(self) -> int:
        return self.base + self.gathered + self.trainable + self.activations + self.logits

    def describe(self) -> str:
        parts = [f"base {_gib(self.base)}" + (f" ({self.shards} shards)" if self.shards > 1 else "")]
        if self.gathered:
            parts.append(f"layers gathered while they run {_gib(self.gathered)}")
        parts += [
            f"Bone blocks with gradients and AdamW state {_gib(self.trainable)}",
            f"activations {_gib(self.activations)} at {self.micro_batch} x {self.seq_length} tokens",
            f"logits {_gib(self.logits)}",
        ]
        return f"about {_gib(self.total)} per device ({', '.join(parts)})"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def estimate_device_memory(
    shape: ModelShape, trainable_params: int, training: TrainingSpec, *, base_bytes_per_param: int = 2
) -> DeviceMemoryEstimate:
    """Bytes one training process of the job holds at its peak (see the module docstring for each term)."""
    processes = training.world_size  # every rank of every node: FSDP's mesh spans them all
    shards = processes if training.sharding == "full" else 1
    micro_batch = math.ceil(training.batch_size / processes)
    s, h = training.max_seq_length, shape.hidden_size
    per_layer = s * micro_batch * h
    if training.gradient_checkpointing:
        activations = per_layer * (
            CHECKPOINTED_BYTES_PER_LAYER_ELEMENT * shape.layers + ACTIVATION_BYTES_PER_LAYER_ELEMENT
        )
    else:
        activations = per_layer * ACTIVATION_BYTES_PER_LAYER_ELEMENT * shape.layers
    gathered = 0
    if shards > 1:
        gathered = (shape.root_params + GATHERED_LAYERS * shape.layer_params) * base_bytes_per_param
    return DeviceMemoryEstimate(
        shards=shards,
        base=math.ceil(shape.params * base_bytes_per_param / shards),
        gathered=gathered,
        trainable=math.ceil(trainable_params * TRAINABLE_BYTES_PER_PARAM / shards),
        activations=activations,
        logits=min(LOSS_CHUNK_TOKENS, micro_batch * s) * shape.vocab_size * LOGIT_BYTES_PER_ELEMENT,
        micro_batch=micro_batch,
        seq_length=s,
    )


def device_memory(advert: dict[str, Any]) -> int | None:
    """The memory of the device one training process of a worker gets: its own GPU for a worker pinned to one
    (``device_memory_bytes``), else its largest GPU; None for a worker without GPUs (CPU: no device limit)."""
    if advert.get("device_memory_bytes"):
        return int(advert["device_memory_bytes"])
    gpus = advert.get("gpu_memory_bytes") or []
    return max((int(b) for b in gpus), default=None)
