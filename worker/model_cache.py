"""The worker's base models: loaded once per process, handed to each job as a copy the job may change.

Why copies: ``get_bone_model`` wraps modules in place, and a job with ``bias != "none"`` trains the base
model's own biases. ``BoneModel.unload()`` undoes the wrapping but not bias updates, nor whatever a job
that died half-way left behind, so each job gets a model of its own instead of borrowing the cached one:

* in a forked RQ work-horse (the normal case) the process is already a private copy-on-write image of the
  parent, which preloaded the model before forking: the job uses it directly, costs nothing, and the
  parent's copy never changes. (No reload either: the design's "second job does not reload the base".)
* in the process that loaded it (SimpleWorker, tests, a direct call) the job gets a ``copy.deepcopy``,
  which costs one model's worth of memory for the job's duration.

CUDA and fork: the CUDA runtime cannot be used in a child forked after the parent initialised it. So the
parent keeps its copy on the CPU (in the dtype the device wants: bf16 for CUDA) and never touches CUDA;
each work-horse moves its copy to the GPU itself. ``worker.main`` also makes ``torch.cuda.is_available``
use NVML, which does not initialise CUDA, for the same reason.

That CPU copy is read in that dtype straight from the memory-mapped safetensors (see
``core.base_model.load_base_model``): page cache that work-horses, and other workers mapping the same file,
share rather than each holding its own.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from core.base_model import LoadedBaseModel, load_base_model, resolve_dtype
from core.settings import Settings

if TYPE_CHECKING:  # transformers is imported when a model loads, not with this module
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    loaded: LoadedBaseModel  # on the CPU
    pid: int  # the process that loaded it: any other pid holds a private (forked) copy


_cache: dict[str, _Entry] = {}
_lock = threading.Lock()
loads = 0  # how many times a base model was read from disk in this process (tests check reuse)


def preload(name: str, settings: Settings, device: torch.device) -> LoadedBaseModel:
    """Load (once) and keep ``name`` on the CPU, in the dtype ``device`` computes in."""
    global loads
    with _lock:
        entry = _cache.get(name)
        if entry is None:
            started = time.perf_counter()
            # Read straight into the dtype ``device`` computes in (bf16 for CUDA, decided without touching
            # CUDA): loading fp32 and casting afterwards would hold the fp32 copy on the host first.
            compute_dtype = resolve_dtype("auto", device)
            loaded = load_base_model(name, settings, device=torch.device("cpu"), dtype=compute_dtype)
            entry = _cache[name] = _Entry(loaded, os.getpid())
            loads += 1
            log.info("loaded base model %r from %s in %.1f s", name, loaded.source, time.perf_counter() - started)
        return entry.loaded


def model_for_job(
    name: str, settings: Settings, device: torch.device
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A model the job may change (see the module doc), already on ``device``, and its tokenizer."""
    loaded = preload(name, settings, device)
    entry = _cache[name]
    if entry.pid == os.getpid():
        model = copy.deepcopy(loaded.model)
    else:
        model = loaded.model  # forked: this process's copy-on-write image is private already
    return model.to(device), loaded.tokenizer


def clear() -> None:
    """Forget every cached model (tests)."""
    global loads
    with _lock:
        _cache.clear()
        loads = 0
