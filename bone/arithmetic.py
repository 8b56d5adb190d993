"""Exact adapter arithmetic for Bone.

A Bone update is linear in its block (``ΔW`` is the tiled ``Bᵀ``), so a weighted sum of Bone adapters on the
same base model is itself a Bone adapter whose block is ``Σ wᵢ Bᵢ`` — exactly, unlike LoRA, where summing
the ``A`` and ``B`` factors is only an approximation. A module that one adapter targets and another does
not simply gets the terms of the adapters that do (a missing block counts as zero).

Bat is not linear in its block (``W(I + B) + B``), so Bat adapters are refused rather than given a
meaning that silently differs from running them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import functional as BF
from .adapter_files import PREFIX
from .config import BoneConfig
from .errors import BoneConfigError

Weighted = tuple[str, BoneConfig, dict[str, torch.Tensor], float]  # (name, config, tensors, weight)


def check_combinable(items: Iterable[tuple[str, BoneConfig]]) -> int:
    """The common ``r`` of adapters that can be summed exactly; raises naming the first one that cannot."""
    rank = None
    for name, config in items:
        if config.variant == "bat":
            raise BoneConfigError(
                f"adapter {name!r} is a Bat adapter: Bat is not linear in its blocks, so a "
                "weighted sum has no exact meaning; combine Bone adapters only",
                "adapters",
            )
        if config.bias != "none" or config.modules_to_save:
            raise BoneConfigError(
                f"adapter {name!r} trains biases or modules_to_save, which cannot be summed "
                "exactly; combine block-only Bone adapters",
                "adapters",
            )
        if rank is None:
            rank = config.r
        elif config.r != rank:
            raise BoneConfigError(
                f"adapter {name!r} has r={config.r}, the others r={rank}: blocks of different r "
                "tile differently and cannot be summed into one block",
                "adapters",
            )
    if rank is None:
        raise BoneConfigError("no adapters to combine", "adapters")
    return rank


def combine(
    items: list[Weighted], *, out_features: dict[str, int] | None = None
) -> tuple[BoneConfig, dict[str, torch.Tensor]]:
    """``Σ wᵢ Bᵢ`` over the adapters' blocks, as a new Bone adapter (config + tensors in PEFT's layout).

    ``out_features`` (module path → out) is needed only for MiSS-mini blocks, which are tiled to (r, out)."""
    rank = check_combinable((name, config) for name, config, _, _ in items)
    summed: dict[str, torch.Tensor] = {}
    for name, config, tensors, weight in items:
        for key, block in tensors.items():
            if not key.endswith((".bone_block", ".miss_block")):
                continue
            key = key[: key.rfind(".")] + ".bone_block"
            block = block.float()
            if config.variant == "mini":
                module = key.removeprefix(PREFIX).removesuffix(".bone_block")
                if out_features is None or module not in out_features:
                    raise BoneConfigError(f"adapter {name!r} is MiSS-mini: pass out_features to expand its blocks")
                block = BF.expand_mini(block, out_features[module])
            summed[key] = summed[key] + weight * block if key in summed else weight * block
    modules = sorted(k.removeprefix(PREFIX).removesuffix(".bone_block") for k in summed)
    first = items[0][1]
    config = BoneConfig(
        r=rank,
        target_modules=modules,
        init_weights=True,
        task_type=first.task_type,
        base_model_name_or_path=first.base_model_name_or_path,
    )
    return config, summed
