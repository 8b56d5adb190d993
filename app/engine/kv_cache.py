"""How the running batch's KV cache takes rows in and lets them go, for each kind of cache layer.

The batch's cache has one column per decode position the batch has seen (its ``width``: the columns of the
batch's attention mask). Rows are left-padded, so within a row the distance between two columns is the
distance between its tokens, which is all a causal or a sliding-window mask looks at: a row computes what it
would alone. Two kinds of layer hold those columns, both in ``app.engine.kv_store``'s preallocated buffers
written in place (no copy of existing columns per step or per join):

- full attention (Llama, Qwen, the global layers of Gemma 2/3): every column;
- sliding window (Mistral, Phi-3, the local layers of Gemma 2/3): only the last ``window - 1`` columns, which
  is all the next token can see, placed in the mask from the batch's width (transformers' ``get_mask_sizes``
  for a sliding layer: its offset).

A join fits each side's columns to what the layer keeps at the merged width (left padding with zeroed,
masked columns), rows leaving move the last rows into their slots and let go of leading columns that are
padding for every row left, and a failed step moves each layer's end back over the column it appended. A
sliding layer lets go of the column a step pushed out of its window only once the step has succeeded
(``settle``): a failed step can then be undone exactly.

Any other layer (quantized, offloaded, static, linear attention, shared KV) cannot be merged, and chunked
attention (Llama 4) counts its chunks from each row's first column, which a join would shift: for those the
model makes its own cache (transformers' ``DynamicCache``) and the engine runs in "drain" mode, where
newcomers wait until the running batch empties, and says so when it starts (a log line and the
``bone_engine_continuous_batching`` gauge).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from app import metrics
from app.engine.kv_store import KVCache, KVLayer, Plan

log = logging.getLogger(__name__)

JOINS, DRAIN = "joins", "drain"
# The layer kinds (transformers' ``layer_types``) whose cache rows can join mid-flight.
JOINABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def windows(model: Any) -> list[int | None] | None:
    """Each attention layer's sliding window (None: full attention) if every layer is a kind ``KVCache``
    holds, else None (the model makes its own cache; the engine drains)."""
    config = _text_config(model)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        kinds, kwargs = get_layer_types_and_kwargs(config)
    except Exception:  # noqa: BLE001 - an older transformers or a config it cannot read: no cache of ours
        return None
    if not kinds or set(kinds) - JOINABLE_LAYER_TYPES:
        return None
    return [each.get("sliding_window") if kind == "sliding_attention" else None for kind, each in zip(kinds, kwargs)]


def new_cache(layer_windows: list[int | None] | None, plan: Plan | None = None) -> KVCache | None:
    """An empty cache for the model's layers (None: the model makes its own, transformers' default)."""
    return None if layer_windows is None else KVCache(layer_windows, plan)


def _is_sliding(layer: Any) -> bool:
    return isinstance(layer, KVLayer) and layer.is_sliding


def layers(cache: Any) -> list | None:
    """The cache's per-layer key/value holders if rows can be merged into it (a ``KVCache``), else None."""
    return cache.kv_layers if isinstance(cache, KVCache) else None


def select(cache: Any, order: list[int], device: torch.device) -> None:
    """Keep rows ``order`` of ``cache`` (old indices, in their new order)."""
    if isinstance(cache, KVCache):
        cache.select(order)
    else:
        cache.batch_select_indices(torch.tensor(order, device=device))


def trim(cache: Any, width: int) -> None:
    """Keep each layer's last columns for a batch now ``width`` wide (its leading columns were padding for
    every row left)."""
    if isinstance(cache, KVCache):
        cache.trim(width)


def settle(cache: Any) -> None:
    """After a step succeeded: sliding layers let go of the column it pushed out of their window."""
    if isinstance(cache, KVCache):
        cache.settle()


def roll_back(cache: Any, width: int) -> bool:
    """Forget the column a failed step appended to the layers it reached, back to a batch ``width`` wide.
    False if the cache is not one this module knows (then it cannot be trusted)."""
    if not isinstance(cache, KVCache):
        return False
    cache.roll_back(width)
    cache.trim(width)
    return True


# --- the mode the engine runs in ---------------------------------------------------------------------------
def join_mode(model: Any) -> tuple[str, str]:
    """Whether rows can join ``model``'s running batch mid-flight (``JOINS``) or wait for it to empty
    (``DRAIN``), and why, from the model's attention layer kinds."""
    kinds = _layer_types(_text_config(model))
    odd = sorted(set(kinds) - JOINABLE_LAYER_TYPES)
    if odd:
        return DRAIN, f"its cache has layers of kind {', '.join(odd)}, which cannot take rows in mid-flight"
    described = " and ".join(
        {"full_attention": "full attention", "sliding_attention": "sliding window"}[k] for k in sorted(set(kinds))
    )
    return JOINS, f"its cache layers are {described or 'full attention'}"


def chunkable(model: Any) -> bool:
    """Whether a prompt can be prefilled in chunks into its own cache and merged like any newcomer: every layer
    one ``KVCache`` holds (a sliding window's chunk sees the kept columns and its own, as transformers'
    ``get_mask_sizes`` for a window says)."""
    return windows(model) is not None


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _layer_types(config: Any) -> list[str]:
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        return list(get_layer_types_and_kwargs(config)[0])
    except Exception:  # noqa: BLE001 - an older transformers or a config it cannot read: the fields themselves
        types = getattr(config, "layer_types", None)
        if types:
            return list(types)
        if getattr(config, "attention_chunk_size", None) is not None:
            return ["chunked_attention"]
        return ["sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"]


def announce(mode: str, reason: str) -> None:
    """Say which mode the engine runs in: a log line and the ``bone_engine_continuous_batching`` gauge."""
    if mode == JOINS:
        log.info("continuous batching: rows join the running batch between steps (%s)", reason)
    else:
        log.warning("continuous batching is off: newcomers wait until the running batch empties (%s)", reason)
    for each in (JOINS, DRAIN):
        metrics.CONTINUOUS_BATCHING.labels(each).set(int(each == mode))
