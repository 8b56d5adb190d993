"""How the running batch's KV cache takes rows in and lets them go, for each kind of cache layer.

The batch's cache has one column per decode position the batch has seen (its ``width``: the columns of the
batch's attention mask). Rows are left-padded, so within a row the distance between two columns is the
distance between its tokens, which is all a causal or a sliding-window mask looks at: a row computes what it
would alone. Two kinds of layer hold those columns:

- full attention (transformers' ``DynamicLayer``: Llama, Qwen, the global layers of Gemma 2/3): every column;
- sliding window (``DynamicSlidingWindowLayer``: Mistral, Phi-3, the local layers of Gemma 2/3): only the
  last ``window - 1`` columns, which is all the next token can see. Its ``cumulative_length`` is the batch's
  width: transformers places the kept columns in the mask from it (``get_mask_sizes``' offset).

A join fits each side's columns to what the layer keeps at the merged width (left padding with masked
columns; a side that already dropped old columns keeps its last ones), rows leaving trim leading columns that
are padding for every row left, and a failed step drops the column it appended. A sliding layer records its
past (``activate_past_recording``), so the column a step pushes out of its window is only let go once the
step has succeeded (``settle``): a failed step can then be undone exactly.

Any other layer (quantized, offloaded, static, linear attention) cannot be merged, and chunked attention
(Llama 4) counts its chunks from each row's first column, which a join would shift: for those the engine
runs in "drain" mode, where newcomers wait until the running batch empties, and says so when it starts (a
log line and the ``bone_engine_continuous_batching`` gauge).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from app import metrics

log = logging.getLogger(__name__)

JOINS, DRAIN = "joins", "drain"
# The layer kinds (transformers' ``layer_types``) whose cache rows can join mid-flight.
JOINABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@lru_cache(maxsize=1)
def _layer_classes() -> tuple[type, type | None]:
    from transformers.cache_utils import DynamicLayer

    try:
        from transformers.cache_utils import DynamicSlidingWindowLayer
    except ImportError:  # an older transformers: its sliding caches do not join
        return DynamicLayer, None
    if not hasattr(DynamicSlidingWindowLayer, "activate_past_recording"):
        return DynamicLayer, None  # without recording its past, a failed step could not be undone
    return DynamicLayer, DynamicSlidingWindowLayer


def _is_sliding(layer: Any) -> bool:
    return type(layer) is _layer_classes()[1]


def layers(cache: Any) -> list | None:
    """The cache's per-layer key/value holders if rows can be merged into it (every layer full attention or
    a sliding window), else None."""
    full, sliding = _layer_classes()
    found = getattr(cache, "layers", None)
    if not found or any(type(layer) is not full and type(layer) is not sliding for layer in found):
        return None
    return list(found)


def adopt(cache: Any) -> None:
    """Make ``cache`` the batch's: its sliding layers keep the column a step pushes out until ``settle``."""
    for layer in layers(cache) or ():
        if _is_sliding(layer):
            layer.activate_past_recording()


def kept(layer: Any, width: int) -> int:
    """The columns ``layer`` holds when the batch has ``width``: all of them, or a sliding window's last
    ``window - 1`` (what transformers keeps; ``get_mask_sizes`` counts on it)."""
    return min(width, layer.sliding_window - 1) if _is_sliding(layer) else width


def merge(running: Any, newcomers: Any, count: int, width: int) -> None:
    """Stack the rows of ``newcomers``' cache under the ``count`` rows of ``running`` (in place), both fitted
    to ``width`` columns. On an exception (out of memory half-way) ``running`` is as it was: the layers
    already merged go back to their first ``count`` rows (views, no copy)."""
    pairs = list(zip(layers(running), layers(newcomers)))
    held: list[int] = []  # the columns each merged layer held before
    try:
        for a, b in pairs:
            n = kept(a, width)
            before = a.keys.shape[-2]
            keys = torch.cat([_pad_cols(a.keys, n), _pad_cols(b.keys, n)], dim=0)
            values = torch.cat([_pad_cols(a.values, n), _pad_cols(b.values, n)], dim=0)
            a.keys, a.values = keys, values
            held.append(before)
    except Exception:
        for (a, _), before in zip(pairs, held):
            start = a.keys.shape[-2] - before
            a.keys, a.values = a.keys[:count, :, start:, :], a.values[:count, :, start:, :]
        raise
    _set_width(running, width)


def trim(cache: Any, width: int) -> None:
    """Keep each layer's last columns for a batch now ``width`` wide (its leading columns were padding for
    every row left)."""
    for layer in layers(cache) or ():
        n = kept(layer, width)
        if layer.keys.shape[-2] > n:
            layer.keys, layer.values = layer.keys[..., -n:, :], layer.values[..., -n:, :]
    _set_width(cache, width)


def settle(cache: Any, width: int) -> None:
    """After a step succeeded: sliding layers let go of the column it pushed out of their window."""
    for layer in layers(cache) or ():
        if _is_sliding(layer) and layer.keys.shape[-2] > kept(layer, width):
            n = kept(layer, width)
            layer.keys, layer.values = layer.keys[..., -n:, :], layer.values[..., -n:, :]


def roll_back(cache: Any, width: int) -> bool:
    """Drop the column a failed step appended to the layers it reached, back to a batch ``width`` wide. False
    if the cache is not made of layers this module knows (then it cannot be trusted)."""
    found = layers(cache)
    if found is None:
        return False
    for layer in found:
        grown = layer.cumulative_length > width if _is_sliding(layer) else layer.keys.shape[-2] > width
        if grown:  # the step appended one column at the end (a sliding layer kept its oldest: recording)
            layer.keys, layer.values = layer.keys[..., :-1, :], layer.values[..., :-1, :]
    trim(cache, width)
    return True


def _set_width(cache: Any, width: int) -> None:
    for layer in layers(cache) or ():
        if _is_sliding(layer):
            layer.cumulative_length = width


def _pad_cols(kv: torch.Tensor, width: int) -> torch.Tensor:
    """``kv`` fitted to ``width`` columns: left-padded with zeros (masked columns), or its last ``width``."""
    have = kv.shape[-2]
    if have == width:
        return kv
    return kv[..., have - width :, :] if have > width else F.pad(kv, (0, 0, width - have, 0))


# --- the mode the engine runs in ---------------------------------------------------------------------------
def join_mode(model: Any) -> tuple[str, str]:
    """Whether rows can join ``model``'s running batch mid-flight (``JOINS``) or wait for it to empty
    (``DRAIN``), and why, from the model's attention layer kinds."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    kinds = _layer_types(config)
    odd = sorted(set(kinds) - JOINABLE_LAYER_TYPES)
    if odd:
        return DRAIN, f"its cache has layers of kind {', '.join(odd)}, which cannot take rows in mid-flight"
    if "sliding_attention" in kinds and _layer_classes()[1] is None:
        return DRAIN, "this transformers cannot undo a sliding-window cache step, so rows cannot join mid-flight"
    described = " and ".join(
        {"full_attention": "full attention", "sliding_attention": "sliding window"}[k] for k in sorted(set(kinds))
    )
    return JOINS, f"its cache layers are {described or 'full attention'}"


def chunkable(model: Any) -> bool:
    """Whether a prompt can be prefilled in chunks into its own cache and merged like any newcomer: every
    layer full attention (a sliding window's cache between chunks is not something ``merge`` is tested on)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return set(_layer_types(config)) <= {"full_attention"}


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
