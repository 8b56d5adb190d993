"""Adapter checkpoints in PEFT's on-disk layout, with strict checks.

- ``adapter_config.json``: PEFT's field names, ``peft_type`` ``"BONE"`` (or ``"MISS"`` when exported).
- ``adapter_model.safetensors``: ``base_model.model.<module path>.bone_block`` (``.miss_block`` for MiSS), no
  adapter name in keys; ``modules_to_save`` as ``base_model.model.<path>.<param>``; trained biases as the
  parameter's path (``<path>.base_layer.bias`` for a wrapped layer, as PEFT names it in memory).

Loading checks every key and shape against the model and names the module on a mismatch. Only safetensors
is read: pickled ``.bin`` files are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from .config import CONFIG_NAME, BoneConfig
from .errors import BoneCheckpointError
from .layer import BoneLinear
from .modules_to_save import ModulesToSave
from .targets import find_modules_to_save, find_targets
from .tree import iter_modules

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
BLOCK_SUFFIXES = (".bone_block", ".miss_block")


@dataclass(frozen=True)
class Expected:
    module: str
    shape: tuple[int, ...]
    kind: str  # "block" | "module" | "bias"


def _unwrap(module: nn.Module) -> nn.Module:
    return module.original_module if isinstance(module, ModulesToSave) else module


def bias_parameters(model: nn.Module, config: BoneConfig, target_names: set[str]) -> dict[str, nn.Parameter]:
    """The biases ``config.bias`` trains, keyed by their path relative to the (wrapped) model."""
    if config.bias == "none":
        return {}
    out: dict[str, nn.Parameter] = {}
    for path, module in iter_modules(model):
        if isinstance(module, ModulesToSave):
            continue  # the trained copy is saved whole
        wrapped = isinstance(module, BoneLinear) or path in target_names
        if config.bias == "bone_only" and not wrapped:
            continue
        base = getattr(module, "base_layer", module) if isinstance(module, BoneLinear) else module
        p = base._parameters.get("bias")
        if isinstance(p, nn.Parameter):
            out[f"{path}.base_layer.bias" if wrapped else f"{path}.bias"] = p
    return out


def expected_entries(model: nn.Module, config: BoneConfig) -> tuple[dict[str, Expected], dict[str, Expected]]:
    """(required, optional) on-disk keys for ``config`` on ``model``; block keys use ``.bone_block``.

    Bias keys are optional: PEFT never saved trained biases, so its checkpoints lack them."""
    required: dict[str, Expected] = {}
    optional: dict[str, Expected] = {}
    targets = find_targets(model, config)
    for t in targets:
        required[f"{PREFIX}{t.name}.bone_block"] = Expected(t.name, config.block_shape(t.out_features), "block")
    for path in find_modules_to_save(model, config):
        for k, v in _unwrap(model.get_submodule(path)).state_dict().items():
            required[f"{PREFIX}{path}.{k}"] = Expected(path, tuple(v.shape), "module")
    for k, p in bias_parameters(model, config, {t.name for t in targets}).items():
        optional[f"{PREFIX}{k}"] = Expected(k.rsplit(".", 1)[0].removesuffix(".base_layer"), tuple(p.shape), "bias")
    return required, optional


def normalize_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map ``.miss_block`` keys onto ``.bone_block``; a module may not carry both."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        nk = k[: -len(".miss_block")] + ".bone_block" if k.endswith(".miss_block") else k
        if nk in out:
            raise BoneCheckpointError(
                f"checkpoint holds both a bone_block and a miss_block for {nk[: -len('.bone_block')]!r}"
            )
        out[nk] = v
    return out


def check_tensors(model: nn.Module, config: BoneConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate a PEFT-layout state dict against the model; returns it with normalised keys or raises."""
    if not isinstance(tensors, dict):
        raise BoneCheckpointError(f"adapter tensors must be a dict, got {type(tensors).__name__}")
    tensors = normalize_keys(tensors)
    required, optional = expected_entries(model, config)
    problems = []
    for k in required:
        if k not in tensors:
            missing = required[k]
            problems.append(f"missing key {k!r} for module {missing.module!r} (expected shape {tuple(missing.shape)})")
    for k, v in tensors.items():
        e = required.get(k) or optional.get(k)
        if e is None:
            mod = k.removeprefix(PREFIX).rsplit(".", 1)[0]
            problems.append(
                f"unexpected key {k!r}: module {mod!r} is not an adapter target of this config on this model"
            )
            continue
        if not torch.is_tensor(v) or not v.is_floating_point():
            problems.append(f"key {k!r} for module {e.module!r} is not a floating-point tensor")
        elif tuple(v.shape) != e.shape:
            problems.append(f"module {e.module!r}: key {k!r} has shape {tuple(v.shape)}, expected {e.shape}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise BoneCheckpointError("adapter checkpoint does not match the model: " + "; ".join(problems[:10]) + more)
    return tensors


class NonFiniteTensorError(BoneCheckpointError):
    """A tensor of an adapter holds NaN or infinity: serving it would turn every answer into noise or an error."""

    def __init__(self, key: str, bad: int, total: int):
        super().__init__(f"tensor {key!r} holds {bad} non-finite value(s) (NaN or infinity) out of {total}")
        self.key = key


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``NonFiniteTensorError`` naming the first (by key) floating-point tensor that holds NaN or ±inf."""
    for key in sorted(tensors):
        value = tensors[key]
        if torch.is_tensor(value) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                raise NonFiniteTensorError(key, int((~finite).sum()), value.numel())


# -- files -------------------------------------------------------------------------------------------------
def read_adapter_dir(directory: str | os.PathLike) -> tuple[BoneConfig, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = os.fspath(directory)
    if not os.path.isdir(d):
        raise BoneCheckpointError(f"adapter directory {d!r} does not exist")
    config = BoneConfig.from_pretrained(d)
    path = os.path.join(d, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(d, "adapter_model.bin")):
            raise BoneCheckpointError(
                f"{d!r} holds only adapter_model.bin; pickled checkpoints are refused (never unpickled), "
                "convert it to adapter_model.safetensors"
            )
        raise BoneCheckpointError(f"no {WEIGHTS_NAME} in {d!r}")
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise BoneCheckpointError(f"cannot read {path}: {exc}") from None
    return config, tensors


def write_adapter_dir(directory: str | os.PathLike, config_dict: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(clean, os.path.join(d, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(d, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def to_format(tensors: dict[str, torch.Tensor], format: str) -> dict[str, torch.Tensor]:
    if format == "miss":
        return {
            (k[: -len(".bone_block")] + ".miss_block" if k.endswith(".bone_block") else k): v
            for k, v in tensors.items()
        }
    return dict(tensors)
