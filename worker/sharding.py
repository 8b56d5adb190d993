"""``training.sharding = "full"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) over a distributed job's model,
so a base that does not fit one device still trains: each rank holds 1/N of every parameter, and a decoder
layer is gathered only while it runs (forward, then again in backward).

* **Units**: every decoder layer is its own unit; the loss module (``worker.loss.CausalLMLoss``) is the root,
  which holds what is left (embeddings, final norm, output head) and gathers it for the whole forward and
  backward (the chunked head runs inside the root's forward, and again in backward when a chunk is recomputed).
* **Trainable vs frozen**: FSDP2 shards every parameter of a unit, the frozen base *and* the Bone blocks. The
  optimizer therefore steps on each rank's shard of the blocks (AdamW is element-wise: the same update as one
  process), and the gradients of the blocks are reduce-scattered (averaged over the ranks) instead of all-reduced.
* **Gathering only the blocks**: checkpoints and the published adapter need whole tensors, but only of the
  trainable parameters. ``trainable_state`` gathers those (``DTensor.full_tensor``: a collective, every rank
  calls it) and ``whole_trainable`` lends them to ``save_pretrained`` on rank 0; the frozen base is never
  gathered for saving. The optimizer's state goes through ``torch.distributed.checkpoint.state_dict`` with
  ``full_state_dict`` (whole moments, keyed by parameter name) and comes back the same way on resume.
* **Evaluation** calls the Bone model directly, not the root's forward: ``root_gathered`` gathers the root
  unit's parameters around it, and every rank evaluates (each layer's gather is a collective).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from bone.layer import BoneLinear


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's repeated blocks, each one FSDP unit (the same ones POST /jobs' memory estimate counts)."""
    from core.memory_estimate import decoder_layers as find

    layers = find(model)
    if not layers:
        raise ValueError(f"training.sharding='full' cannot find the decoder layers of {type(model).__name__}")
    return layers


def shard(root: torch.nn.Module, model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """Apply ``fully_shard`` to each decoder layer of ``model`` and then to ``root`` (the loss module that wraps
    it). Every rank loaded the same base; rank 0's trainable weights are broadcast first, as DDP would."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    # A Bone layer keeps its tensors for the no-grad fast path; FSDP has just replaced them (shards now, whole
    # ones only while a unit runs), so the kept ones would be stale: take the plain path.
    for module in model.modules():
        if isinstance(module, BoneLinear):
            module.forget_fast_path()
    return root


@contextmanager
def gradient_sync(root: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """FSDP2's ``no_sync``: with ``enabled=False`` the gradients accumulate unsharded, reduced on a later
    micro-batch's backward."""
    root.set_requires_gradient_sync(enabled)  # type: ignore[operator]
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)  # type: ignore[operator]


@contextmanager
def root_gathered(root: torch.nn.Module) -> Iterator[None]:
    """The root unit's parameters whole (embeddings, head) while the model is called outside the root's forward."""
    root.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        root.reshard()  # type: ignore[operator]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter whole, on the CPU, by name. A collective: every rank must call it, in the same
    order (``named_parameters`` is)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = whole.detach().to("cpu").contiguous()
    return out


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the sharded parameters: each rank keeps its own shard (every rank read the same
    file, so nothing is sent)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, whole in tensors.items():
            p = params[name]
            if isinstance(p, DTensor):
                piece = distribute_tensor(whole.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(piece.to_local())
            else:
                p.copy_(whole)


def whole_float(value: torch.Tensor) -> float:
    """A scalar that may be a DTensor (``clip_grad_norm_`` over sharded gradients returns one) as a float."""
    full_tensor = getattr(value, "full_tensor", None)
    return float(full_tensor() if full_tensor is not None else value)


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with whole tensors, keyed by parameter name (rank 0 gets it; a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Each rank loads the same whole state and keeps its shards of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextmanager
def whole_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Lend ``tensors`` (from ``trainable_state``) to the model in place of its sharded trainable parameters, so
    code that reads parameters (``save_pretrained``) sees whole ones; no collective, so rank 0 alone may run it."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for name, whole in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            swapped.append((owner, leaf, owner._parameters[leaf]))  # type: ignore[arg-type]
            owner._parameters[leaf] = torch.nn.Parameter(whole, requires_grad=False)
        yield
    finally:
        for owner, leaf, original in reversed(swapped):
            owner._parameters[leaf] = original
