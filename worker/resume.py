"""Checkpoints of a running job, so a job whose worker died resumes instead of starting over.

    <job work dir>/checkpoints/step-00000040/
        adapter_config.json, adapter_model.safetensors   PEFT layout: publishable as an adapter as is
        trainable.safetensors   every parameter the optimizer updates, by name, exactly (fp32 masters)
        optimizer.pt            AdamW's state (moments, step counts)
        rng.pt                  torch CPU (and CUDA) generator states
        state.json              loop position: step, micro-batches consumed, losses, eval history, Python RNG

Written into a hidden temporary folder, fsynced, then renamed: a folder named ``step-*`` is always whole,
so "the newest complete checkpoint" is simply the highest step. Only the newest ``keep`` are kept.
The learning-rate schedule is a pure function of the step (``worker.train.get_lr``): restoring the step
restores the scheduler.

With a ``JobResume`` (``core.storage.resume_state``: the registry's store, which every worker reads) the
work dir is only a scratch copy: ``save`` also puts each checkpoint there, and ``newest`` fetches the newest
one from there, so a job re-queued onto another machine resumes where the dead one stopped.

A sharded job (``training.sharding = "full"``, worker/sharding.py) writes the same files: every rank gathers
the whole trainable parameters and AdamW's state first (``Gathered``), rank 0 writes them; its ``optimizer.pt``
is keyed by parameter name (``torch.distributed.checkpoint``'s full state dict). On resume every rank reads
the whole tensors and keeps its shards.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from core.storage import fsync_path

if TYPE_CHECKING:
    from bone import BoneModel
    from core.storage.resume_state import JobResume

STATE_FILE = "state.json"
_PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def newest(root: Path, shared: JobResume | None = None) -> Path | None:
    """The complete checkpoint with the highest step, or None. With ``shared``: the newest one in the shared
    store, fetched into ``root``; the work dir's own only when the store has none (written before there was one)."""
    if shared is not None:
        fetched = shared.fetch_newest(root)
        if fetched is not None:
            return fetched
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file())
    return done[-1] if done else None


@dataclass
class Gathered:
    """A sharded model's whole trainable parameters and optimizer state (worker/sharding.py), gathered by
    every rank for rank 0 to write."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def save(
    root: Path,
    step: int,
    model: BoneModel,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    *,
    adapter_name: str,
    keep: int,
    shared: JobResume | None = None,
    gathered: Gathered | None = None,
    trainable: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``trainable``: the parameters this checkpoint holds, by the names it stores them under (default: every
    parameter that requires grad, by its own name). Co-training (worker/cotrain.py) passes one job's blocks
    named as a lone job's would be, so a checkpoint resumes alone or in any group."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        if gathered is None:
            model.save_pretrained(tmp, adapter_name=adapter_name)
            own = trainable if trainable is not None else trainable_parameters(model)
            trainable = {n: p.detach().to("cpu").contiguous() for n, p in own.items()}
            optimizer_state = optimizer.state_dict()
        else:
            from worker.sharding import whole_trainable

            with whole_trainable(model, gathered.trainable):
                model.save_pretrained(tmp, adapter_name=adapter_name)
            trainable, optimizer_state = gathered.trainable, gathered.optimizer
        save_file(trainable, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        py_version, py_state, py_gauss = random.getstate()
        (tmp / STATE_FILE).write_text(
            json.dumps({**state, "step": step, "python_rng": [py_version, list(py_state), py_gauss]})
        )
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
        target = step_dir(root, step)
        if target.exists():  # a previous attempt reached this step too: same content, replace it
            shutil.rmtree(target)
        os.rename(tmp, target)
        fsync_path(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(root, keep)
    if shared is not None:
        shared.put(step, target, keep=keep)
    return target


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    sharded: bool = False,
    trainable: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG states in place; returns the loop state saved with them. With
    ``sharded`` the model is FSDP-sharded and the checkpoint was written by a sharded run. ``trainable``: the
    parameters to restore, by their stored names (as ``save`` took them; default: every trainable one)."""
    saved = load_file(path / "trainable.safetensors")
    params = trainable if trainable is not None else trainable_parameters(model)
    missing = sorted(set(params) ^ set(saved))
    if missing:
        raise ValueError(f"checkpoint {path.name} does not match the model's trainable parameters: {missing[:3]}")
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if sharded:
        from worker.sharding import load_optimizer_state, load_trainable_state

        load_trainable_state(model, saved)
        load_optimizer_state(model, optimizer, optimizer_state)
    else:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / STATE_FILE).read_text())
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state


def prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
