"""``BoneModel`` / ``get_bone_model``: wrap the targeted layers of a Hugging Face model in place and manage
its adapters (add, load, activate, delete, disable, merge, save), PEFT-style, and run it with one adapter per
row of a batch.

Per-row adapters (row i uses adapter ``names[i]`` or ``"__base__"``):

- ``model(input_ids, adapter_names=[...])`` / ``model.generate(..., adapter_names=[...])``: one call; each
  layer gathers its per-row blocks on the first forward of the call (generate reuses them for every token).
- ``with model.routing(names) as routed: routed(...); routed(...)``: a serving loop that calls the model
  step by step itself (a KV cache, continuous batching). ``routed`` forwards to the wrapped model (also
  ``routed.generate``) with the rows' adapters, and every call reuses the per-layer plans of the first one —
  the gather happens once per batch composition, not once per token. Open a new ``routing`` when rows join
  or leave. The plans are dropped when the block ends, and automatically whenever an adapter is added to,
  deleted from, merged into or moved with a layer (the next call rebuilds them), so they never go stale.

Adapter names are any strings the model can hold as keys: PEFT's own ``"default"``, a service's slot names.
Which names a service accepts is the service's rule, checked where its requests arrive.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import adapter_files
from . import merge as merging
from . import save as saving
from .block_stacks import BlockStacks
from .config import BASE_ADAPTER, BoneConfig
from .errors import BoneCheckpointError, BoneConfigError, BoneError
from .layer import BoneLinear
from .modules_to_save import ModulesToSave
from .routing import RoutedModel, RowRouting, routing_context
from .targets import find_modules_to_save, find_targets, resolve_target_spec
from .tree import bone_layers, saved_modules, set_submodule


class BoneModel(nn.Module):
    """A Hugging Face model with Bone adapters. ``base_model`` is the wrapped model (changed in place)."""

    def __init__(self, model: nn.Module, autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_model: Any = model  # a transformers model: generate, name_or_path, get_submodule, ...
        self.adapter_configs: dict[str, BoneConfig] = {}
        self.active_adapters: list[str] = []
        self._trainable: dict[str, bool] = {}
        self._autocast_adapter_dtype = autocast_adapter_dtype
        self._disabled = False
        for p in model.parameters():  # the base is frozen; set_adapter re-enables what an adapter trains
            p.requires_grad_(False)

    # -- attribute access falls through to the HF model (config, device, generation_config, ...) ----------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self._modules["base_model"], name)

    @property
    def peft_config(self) -> dict[str, BoneConfig]:
        return self.adapter_configs

    @property
    def active_adapter(self) -> str | None:
        return self.active_adapters[0] if self.active_adapters else None

    # -- layers ------------------------------------------------------------------------------------------
    def bone_layers(self) -> list[tuple[str, BoneLinear]]:
        return bone_layers(self.base_model)

    def _adapter_dtype(self, weight: torch.Tensor) -> torch.dtype:
        # like PEFT's autocast_adapter_dtype: half-precision bases get float32 adapters
        if self._autocast_adapter_dtype and weight.dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return weight.dtype

    # -- adding adapters ---------------------------------------------------------------------------------
    def _check_new_name(self, name: str, config: BoneConfig) -> None:
        # Not a naming policy: what torch can hold as a parameter key, and the one name routing reserves.
        if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
            raise BoneConfigError(
                f"adapter name {name!r} cannot be used: it must be a non-empty string without '.' (torch's "
                f"rule for parameter keys), other than {BASE_ADAPTER!r} (per-row routing's name for the base)",
                "adapter_name",
            )
        if name in self.adapter_configs:
            raise BoneConfigError(f"adapter {name!r} already exists; delete it first", "adapter_name")
        if not isinstance(config, BoneConfig):
            raise BoneConfigError(f"expected a BoneConfig, got {type(config).__name__}")
        if config.bias != "none":
            other = [n for n, c in self.adapter_configs.items() if c.bias != "none"]
            if other:
                raise BoneConfigError(
                    f"only one adapter may train biases (biases belong to the shared base); {other[0]!r} already "
                    f"has bias={self.adapter_configs[other[0]].bias!r}",
                    "bias",
                )

    def add_adapter(self, adapter_name: str, config: BoneConfig) -> None:
        """Create a new adapter (not activated; ``set_adapter`` activates it). Blocks follow ``init_weights``."""
        self._add(adapter_name, config, None, trainable=True)

    def add_adapter_from_state_dict(
        self, adapter_name: str, config: BoneConfig, tensors: dict[str, torch.Tensor], is_trainable: bool = False
    ) -> None:
        """Add an adapter from tensors in PEFT's on-disk layout; every key and shape is checked first, so a
        failed load leaves the model unchanged."""
        self._check_new_name(adapter_name, config)
        checked = adapter_files.check_tensors(self.base_model, config, tensors)
        self._add(adapter_name, config, checked, trainable=is_trainable)

    def _add(self, name: str, config: BoneConfig, tensors: dict[str, torch.Tensor] | None, trainable: bool) -> None:
        self._check_new_name(name, config)
        targets = find_targets(self.base_model, config)  # raises before anything is changed
        mts_paths = find_modules_to_save(self.base_model, config)
        for t in targets:
            module = self.base_model.get_submodule(t.name)
            if not isinstance(module, BoneLinear):
                module = BoneLinear(module)
                set_submodule(self.base_model, t.name, module)
            module.add_adapter(name, config, dtype=self._adapter_dtype(module.weight), initialize=tensors is None)
            if tensors is not None:
                with torch.no_grad():
                    module.bone_block[name].copy_(tensors[f"{adapter_files.PREFIX}{t.name}.bone_block"])
            module.set_active(self.active_adapters)
        for path in mts_paths:
            module = self.base_model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                set_submodule(self.base_model, path, module)
            module.add_adapter(name)
            if tensors is not None:
                sd = {
                    k[len(f"{adapter_files.PREFIX}{path}.") :]: v
                    for k, v in tensors.items()
                    if k.startswith(f"{adapter_files.PREFIX}{path}.")
                }
                module.modules_to_save[name].load_state_dict(sd, strict=True)
            module.set_active(self.active_adapters)
        if tensors is not None and config.bias != "none":
            params = adapter_files.bias_parameters(self.base_model, config, {t.name for t in targets})
            with torch.no_grad():
                for k, p in params.items():
                    v = tensors.get(f"{adapter_files.PREFIX}{k}")
                    if v is not None:
                        p.copy_(v)
        if config.target_modules is None:
            # like PEFT: record the per-architecture default that was applied, so the saved
            # adapter_config.json says which modules it adapts even where that default differs
            config = dataclasses.replace(config, target_modules=sorted(resolve_target_spec(self.base_model, config)))
        self.adapter_configs[name] = config
        self._trainable[name] = trainable
        if config.bias == "none":
            # a new adapter is inactive, so it trains nothing and every other flag stays as it was: freezing
            # its own tensors is enough (a server adding adapters one by one must not pay for all of them)
            for t in targets:
                self.base_model.get_submodule(t.name).bone_block[name].requires_grad_(False)
            for path in mts_paths:
                self.base_model.get_submodule(path).modules_to_save[name].requires_grad_(False)
        else:
            self._update_requires_grad()

    def load_adapter(self, path: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Load a Bone / Bat / MiSS checkpoint (ours or PEFT's) as a new, inactive adapter."""
        config, tensors = adapter_files.read_adapter_dir(path)
        self.add_adapter_from_state_dict(adapter_name, config, tensors, is_trainable=is_trainable)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> BoneModel:
        config, tensors = adapter_files.read_adapter_dir(path)
        bm = cls(model, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            bm.add_adapter_from_state_dict(adapter_name, config, tensors, is_trainable=is_trainable)
        except BoneCheckpointError:
            merging.unwrap(model)
            raise
        bm.set_adapter(adapter_name)
        if not is_trainable:
            bm.eval()
        return bm

    # -- activation --------------------------------------------------------------------------------------
    def _check_names(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        for n in names:
            if n not in self.adapter_configs:
                raise BoneError(f"unknown adapter {n!r}; adapters: {sorted(self.adapter_configs)}")
        return names

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter or several (applied in list order)."""
        names = self._check_names([adapter_name] if isinstance(adapter_name, str) else adapter_name)
        self.active_adapters = names
        for _, layer in self.bone_layers():
            layer.set_active(names)
        for _, w in saved_modules(self.base_model):
            w.set_active(names)
        self._update_requires_grad()

    def _update_requires_grad(self) -> None:
        """Trainable = blocks / module copies of active, trainable adapters, and the biases they train."""
        live = set() if self._disabled else {n for n in self.active_adapters if self._trainable.get(n)}
        for _, layer in self.bone_layers():
            for n, p in layer.bone_block.items():
                p.requires_grad_(n in live)
        for _, w in saved_modules(self.base_model):
            for n, m in w.modules_to_save.items():
                m.requires_grad_(n in live)
        bias_cfg = next((self.adapter_configs[n] for n in live if self.adapter_configs[n].bias != "none"), None)
        if any(c.bias != "none" for c in self.adapter_configs.values()):
            all_bias = BoneConfig(r=1, target_modules=["__none__"], bias="all")
            for p in adapter_files.bias_parameters(self.base_model, all_bias, set()).values():
                p.requires_grad_(False)
            if bias_cfg is not None:
                for p in adapter_files.bias_parameters(self.base_model, bias_cfg, set()).values():
                    p.requires_grad_(True)

    @contextmanager
    def disable_adapter(self):
        """Run the base model: adapters off (merged ones are unmerged first), nothing trainable inside."""
        if merging.is_merged(self.base_model):
            self.unmerge_adapter()
        prev = self._disabled
        self._set_disabled(True)
        try:
            yield
        finally:
            self._set_disabled(prev)

    def _set_disabled(self, flag: bool) -> None:
        self._disabled = flag
        for _, layer in self.bone_layers():
            layer.set_disabled(flag)
        for _, w in saved_modules(self.base_model):
            w.set_disabled(flag)
        self._update_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_names([adapter_name])
        for path, layer in self.bone_layers():
            if adapter_name in layer.merged_adapters:
                raise BoneError(f"adapter {adapter_name!r} is merged (e.g. in {path!r}); unmerge_adapter() first")
        for path, layer in self.bone_layers():
            layer.delete_adapter(adapter_name)
            if not layer.bone_block and not layer.merged_adapters:
                set_submodule(self.base_model, path, layer.base_layer)  # unwrap: no cost for unused layers
        for path, w in saved_modules(self.base_model):
            w.delete_adapter(adapter_name)
            if not len(w.modules_to_save):
                set_submodule(self.base_model, path, w.original_module)
        bias = self.adapter_configs.pop(adapter_name).bias
        self._trainable.pop(adapter_name, None)
        if adapter_name not in self.active_adapters and bias == "none":
            return  # activation and every requires_grad flag are as they were (the layers dropped it above)
        active = [n for n in self.active_adapters if n != adapter_name]
        if not active and self.adapter_configs and adapter_name in self.active_adapters:
            active = [next(iter(self.adapter_configs))]  # PEFT: the first remaining adapter becomes active
        self.set_adapter(active) if active else self._clear_active()

    def _clear_active(self) -> None:
        self.active_adapters = []
        for _, layer in self.bone_layers():
            layer.set_active([])
        for _, w in saved_modules(self.base_model):
            w.set_active([])
        self._update_requires_grad()

    # -- merging and unloading (bone.merge) ---------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters (the active ones by default) into the base weights, in order; ``safe_merge``
        checks every new weight for NaN/inf first and rolls back on failure."""
        names = self._check_names(self.active_adapters if adapter_names is None else adapter_names)
        merging.merge(self.base_model, names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        merging.unmerge(self.base_model)

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the (active) adapters and return the plain HF model (no Bone modules left)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._forget_all(merging.unwrap(self.base_model, keep=adapter_names or self.active_adapters))

    def unload(self) -> nn.Module:
        """Drop every adapter without merging; returns the plain HF model."""
        merging.unmerge(self.base_model)
        return self._forget_all(merging.unwrap(self.base_model))

    def _forget_all(self, model: nn.Module) -> nn.Module:
        self.adapter_configs.clear()
        self.active_adapters = []
        return model

    # -- saving (bone.save) --------------------------------------------------------------------------------
    def _resolve_one(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            if len(self.active_adapters) != 1:
                raise BoneError(f"active adapters are {self.active_adapters}; pass adapter_name to choose one")
            return self.active_adapters[0]
        return self._check_names([adapter_name])[0]

    def get_adapter_state_dict(self, adapter_name: str | None = None, format: str = "bone") -> dict[str, torch.Tensor]:
        """This adapter's tensors in PEFT's on-disk layout (never another adapter's)."""
        name = self._resolve_one(adapter_name)
        return saving.adapter_state_dict(self.base_model, name, self.adapter_configs[name], format)

    def save_pretrained(
        self, save_directory: str | os.PathLike, adapter_name: str | None = None, format: str = "bone"
    ) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for one adapter (the active one by
        default). ``format="miss"`` writes the MiSS form that current PEFT loads."""
        name = self._resolve_one(adapter_name)
        saving.save_adapter(self.base_model, save_directory, name, self.adapter_configs[name], format)

    def export_miss(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        self.save_pretrained(save_directory, adapter_name, format="miss")

    # -- per-row adapters (bone.routing) ---------------------------------------------------------------------
    def _row_names(self, adapter_names: Any, kwargs: dict) -> list[str]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise BoneError("adapter_names must be a list with one adapter name (or '__base__') per row")
        names = list(adapter_names)
        for n in names:
            if n != BASE_ADAPTER and n not in self.adapter_configs:
                raise BoneError(f"unknown adapter {n!r} in adapter_names; adapters: {sorted(self.adapter_configs)}")
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if torch.is_tensor(ref) and ref.dim() >= 1 and ref.shape[0] != len(names):
            raise BoneError(f"adapter_names has {len(names)} entries for a batch of {ref.shape[0]} rows")
        if self._disabled:
            raise BoneError("adapter_names cannot be used inside disable_adapter()")
        if merging.is_merged(self.base_model):
            raise BoneError("adapter_names cannot be used while adapters are merged; call unmerge_adapter() first")
        return names

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        if args and "input_ids" not in kwargs and torch.is_tensor(args[0]):
            kwargs["input_ids"], args = args[0], args[1:]
        names = self._row_names(adapter_names, kwargs)
        with routing_context(names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        if args and "input_ids" not in kwargs and torch.is_tensor(args[0]):
            kwargs["input_ids"], args = args[0], args[1:]
        names = self._row_names(adapter_names, kwargs)
        with routing_context(names):  # per-layer gathered blocks are built on the first step, then reused
            return self.base_model.generate(*args, **kwargs)

    @contextmanager
    def routing(self, adapter_names: list[str], bat_budget_bytes: int | None = None, stacks: BlockStacks | None = None):
        """Per-row adapter selection reusable across calls: yields a :class:`~bone.routing.RoutedModel`;
        ``routed(**kwargs)`` runs the wrapped model with row i on ``adapter_names[i]`` (``"__base__"``: the
        base model), reusing the per-layer plans (gathered blocks) built by its first call. Names are
        checked once, here; the batch of every call must have ``len(adapter_names)`` rows (or a multiple:
        rows expanded in place, e.g. beams). ``bat_budget_bytes``: see :class:`~bone.routing.RowRouting`.
        ``stacks``: a :class:`~bone.block_stacks.BlockStacks` shared by the routings of one serving loop's
        batch, so a new composition reuses the stacked blocks of the last one (its holder counts and frees them)."""
        names = self._row_names(adapter_names, {})
        routed = RoutedModel(self.base_model, RowRouting(names, bat_budget_bytes, stacks))
        try:
            yield routed
        finally:
            routed.close()

    # -- parameters --------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")


def get_bone_model(
    model: nn.Module, config: BoneConfig, adapter_name: str = "default", autocast_adapter_dtype: bool = True
) -> BoneModel:
    """Wrap ``model`` in place with one active, trainable Bone adapter; everything else is frozen except
    ``modules_to_save`` copies and the biases ``config.bias`` selects."""
    if isinstance(model, BoneModel):
        raise BoneError("model is already a BoneModel; use add_adapter")
    find_targets(model, config)  # fail before freezing anything
    bm = BoneModel(model, autocast_adapter_dtype=autocast_adapter_dtype)
    bm.add_adapter(adapter_name, config)
    bm.set_adapter(adapter_name)
    return bm
