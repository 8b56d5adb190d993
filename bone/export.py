"""Export a Bone adapter as a standard PEFT LoRA adapter, so vLLM, LoRAX or PEFT's LoRA serve it unchanged.

A Bone update is exactly a LoRA update: ``ΔW = Bᵀ · E`` where ``E`` is the ``r × in`` 0/1 matrix whose row
``c`` selects the input columns ``j`` with ``j mod r == c``. So ``lora_B = Bᵀ`` (out × r), ``lora_A = E``
(r × in) and ``lora_alpha = r`` (scale 1): rank ≤ r, no approximation.

Bat is weight-dependent (``ΔW_ij = W_ij B_i + B_i``): its dense delta is generally full-rank, so it is
exported through a truncated SVD of that delta, and the relative approximation error is reported. The rank
is the smallest that meets a relative-error ``tolerance`` in every module (default ``DEFAULT_BAT_TOLERANCE``),
or a fixed ``bat_rank``; an export whose error is at float32 round-off (``EXACT_RELATIVE_ERROR``) is exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import functional as BF
from .adapter_files import PREFIX, check_tensors, write_adapter_dir
from .config import BoneConfig
from .errors import BoneConfigError
from .targets import find_targets

# ‖ΔW − BA‖/‖ΔW‖ below this is float32 round-off of the reconstruction itself: the export is exact.
EXACT_RELATIVE_ERROR = 1e-5
# Bat without an explicit rank: the smallest rank whose relative error is at most this in every module
# (greedy output of the exported LoRA then matches the Bat adapter's).
DEFAULT_BAT_TOLERANCE = 1e-4


@dataclass
class LoraExport:
    config: dict
    tensors: dict[str, torch.Tensor]
    rank: int
    exact: bool
    # Bat only: per module, ‖ΔW − B_lora A_lora‖_F / ‖ΔW‖_F
    relative_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)

    def save(self, directory: str | os.PathLike) -> None:
        write_adapter_dir(directory, self.config, self.tensors)


def selection_matrix(r: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """``E`` (r × in): ``E[c, j] = 1`` iff ``j mod r == c``; rows past ``in`` (when r > in) stay zero."""
    columns = torch.arange(in_features)
    e = torch.zeros(r, in_features, dtype=dtype)
    e[columns % r, columns] = 1.0
    return e


def _lora_config(config: BoneConfig, rank: int, target_names: list[str], fan_in_fan_out: bool) -> dict:
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,  # scale alpha/r = 1: the factors carry ΔW exactly
        "target_modules": sorted(target_names),  # full module paths: PEFT matches them exactly
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "revision": config.revision,
        "inference_mode": True,
    }


def to_lora(
    model: nn.Module,
    config: BoneConfig,
    tensors: dict[str, torch.Tensor],
    *,
    bat_rank: int | None = None,
    tolerance: float | None = None,
) -> LoraExport:
    """LoRA factors for one adapter checkpoint (``tensors`` in PEFT's layout) on ``model`` (the plain HF
    base model; for Bone only its module shapes matter, so a meta-device model works; Bat needs weights).

    Bat only (Bone is exact at rank r and ignores both): ``bat_rank`` fixes the rank of the truncated SVD;
    otherwise the rank is the smallest whose relative error is at most ``tolerance`` (default
    ``DEFAULT_BAT_TOLERANCE``) in every module."""
    if bat_rank is not None and tolerance is not None:
        raise BoneConfigError("give a LoRA rank or a tolerance, not both (the tolerance chooses the rank)", "tolerance")
    if tolerance is not None and not 0 < tolerance < 1:
        raise BoneConfigError(f"tolerance is a relative error in (0, 1), got {tolerance}", "tolerance")
    if config.bias != "none" or config.modules_to_save:
        raise BoneConfigError(
            "LoRA export covers adapter blocks only; this adapter also trains biases or "
            "modules_to_save, which a LoRA adapter cannot carry the same way",
            "bias",
        )
    tensors = check_tensors(model, config, tensors)
    targets = find_targets(model, config)
    variant = config.variant
    if variant == "bat":
        deltas = {
            t.name: _bat_delta(
                model.get_submodule(t.name), tensors[f"{PREFIX}{t.name}.bone_block"].float(), t.is_conv1d
            )
            for t in targets
        }
        rank = bat_rank or _rank_for(deltas.values(), tolerance or DEFAULT_BAT_TOLERANCE)
    else:
        rank = config.r
    if rank <= 0:
        raise BoneConfigError(f"LoRA rank must be positive, got {rank}", "rank")
    out: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for target in targets:
        key = f"{PREFIX}{target.name}"
        if variant == "bat":
            lora_b, lora_a, errors[target.name] = _svd_factors(deltas.pop(target.name), rank)
        else:
            block = tensors[f"{key}.bone_block"].float()
            if variant == "mini":
                block = BF.expand_mini(block, target.out_features)
            lora_b = block.t().contiguous()  # (out, r)
            lora_a = selection_matrix(config.r, target.in_features)
        out[f"{key}.lora_A.weight"] = lora_a.contiguous()
        out[f"{key}.lora_B.weight"] = lora_b.contiguous()
    fan_in_fan_out = any(t.is_conv1d for t in targets)
    if fan_in_fan_out and not all(t.is_conv1d for t in targets):
        raise BoneConfigError(
            "LoRA's fan_in_fan_out is one flag per adapter: cannot export targets that mix Linear and Conv1D layers",
            "target_modules",
        )
    exact = variant != "bat" or max(errors.values(), default=0.0) <= EXACT_RELATIVE_ERROR
    return LoraExport(
        config=_lora_config(config, rank, [t.name for t in targets], fan_in_fan_out),
        tensors=out,
        rank=rank,
        exact=exact,
        relative_errors=errors,
    )


def _bat_delta(module: nn.Module, block: torch.Tensor, conv1d: bool) -> tuple[torch.Tensor, ...]:
    """A Bat module's dense update ΔW (out × in) and its SVD: (ΔW, u, s, vh)."""
    base: Any = getattr(module, "base_layer", module)
    weight = base.weight.detach().float()
    if weight.is_meta:
        raise BoneConfigError(
            "exporting a Bat adapter needs the base model's real weights (its update depends "
            "on them), not a meta-device model"
        )
    logical = weight.t() if conv1d else weight
    delta = BF.bat_weight(weight, block, conv1d) - logical  # (out, in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return delta, u, s, vh


def _rank_for(deltas, tolerance: float) -> int:
    """The smallest rank whose truncation error ‖ΔW − ΔW_k‖/‖ΔW‖ (the tail of the singular values) is at
    most ``tolerance`` in every module."""
    rank = 1
    for _, _, s, _ in deltas:
        energy = s.double().square()
        total = float(energy.sum())
        if total == 0:
            continue
        tail = (energy.flip(0).cumsum(0).flip(0) / total).sqrt()  # tail[k]: relative error at rank k
        fits = (tail <= tolerance).nonzero()
        rank = max(rank, int(fits[0]) if fits.numel() else s.numel())
    return rank


def _svd_factors(svd: tuple[torch.Tensor, ...], rank: int):
    delta, u, s, vh = svd
    k = min(rank, s.numel())
    lora_b = u[:, :k] * s[:k]  # (out, k)
    lora_a = vh[:k]  # (k, in)
    if k < rank:  # pad to the declared rank with zeros so every module has the same shapes
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - k)], dim=1)
        lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - k, lora_a.shape[1])], dim=0)
    norm = torch.linalg.norm(delta)
    residual = torch.linalg.norm(delta - lora_b @ lora_a)
    return lora_b, lora_a, float(residual / norm) if norm > 0 else 0.0
