"""``BoneLinear``: a Bone / Bat / MiSS-mini adapter layer around an ``nn.Linear`` or a transformers ``Conv1D``.

Forward rules (several active adapters apply in the active order):
- Bone: ``y = base(x) + S_r(x) @ B`` with ``B`` (r, out); S_r sums the zero-padded r-wide chunks of x.
- mini: as Bone with the (r, mini_r) block tiled to (r, out).
- Bat: the dense ``W'_ij = W_ij (I + B_i) + B_i`` is built blockwise and one F.linear runs with it.
Bone adapters add up; a Bat adapter acts on the weight as updated by the adapters before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as BF
from .config import BoneConfig
from .errors import BoneConfigError, BoneError
from .linear_types import Conv1D
from .routing import current_routing, row_forward
from .train_path import BatTrainFn, BoneAddFn, additive_default, bone_train


class BoneLinear(nn.Module):
    """Wraps one Linear / Conv1D and holds every adapter's block for it (``bone_block[adapter_name]``) and its
    config (``adapter_config[adapter_name]``)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise BoneConfigError(
                f"BoneLinear wraps torch.nn.Linear or transformers' Conv1D, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.is_conv1d = isinstance(base_layer, Conv1D)
        if self.is_conv1d:
            self.in_features, self.out_features = (int(s) for s in base_layer.weight.shape)
        else:
            linear = cast(nn.Linear, base_layer)
            self.in_features, self.out_features = linear.in_features, linear.out_features
        # exact types only: a subclass (e.g. a quantized Linear) may not hold a plain float weight
        self._plain = type(base_layer) in (nn.Linear, Conv1D)
        # the base is exactly nn.Linear: its weight is a plain float (out, in) tensor for F.linear
        self.plain_linear = self._plain and not self.is_conv1d
        self.bone_block = nn.ParameterDict()
        self.adapter_config: dict[str, BoneConfig] = {}
        self.merged_adapters: list[str] = []
        self._active: tuple[str, ...] = ()
        self._dense = False  # some active adapter is Bat -> dense weight path
        self._disabled = False
        # Inference fast path (one active plain Bone adapter): the tensors and ints the forward needs, kept
        # in a tuple so a decode step pays no module/dict lookups. Rebuilt by _refresh() whenever anything
        # it depends on changes (adapters, activation, merge, disable, .to(), load_state_dict).
        self._fast: tuple | None = None
        self._version = 0
        self._state_version = 0
        # Slot for bone.routing's per-row plan of this layer (its type is routing's business). Emptied on any
        # change above, so a plan never outlives the state it was built from.
        self.row_plan: Any = None
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._refresh())

    # -- what per-row routing (bone.routing) asks of the layer ---------------------------------------
    @property
    def version(self) -> int:
        """Changes whenever adapters, activation, merges, disabling, device or dtype change."""
        return self._version

    @property
    def state_version(self) -> int:
        """Changes when what a per-row plan computes from changes (merges, disabling, device or dtype, a
        state-dict load), not when adapters are added, deleted or (de)activated: a serving pool loading one
        adapter must not make every running plan rebuild (bone.routing checks the adapters a plan uses)."""
        return self._state_version

    @property
    def disabled(self) -> bool:
        return self._disabled

    def set_disabled(self, flag: bool) -> None:
        self._disabled = bool(flag)
        self._refresh()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._refresh()
        return out

    def forget_fast_path(self) -> None:
        """Drop the tensors kept for the no-grad fast path, for a caller that replaced the parameters behind
        the layer's back (FSDP sharding swaps them for shards): the plain path reads the parameters anew."""
        self._fast = None

    def _refresh(self, state: bool = True) -> None:
        """``state``: False when only the set of adapters or the active ones changed (see state_version)."""
        self._fast = None
        self.row_plan = None
        self._version += 1
        self._state_version += state
        if self._disabled or self.merged_adapters or len(self._active) != 1:
            return
        n = self._active[0]
        config = self.adapter_config[n]
        if config.variant != "bone" or not self._plain:
            return
        w = self.base_layer.weight
        b = self.base_layer.bias
        blk = self.bone_block[n]
        if blk.dtype != w.dtype or blk.device != w.device:
            return
        r = config.r
        nf, rem = divmod(self.in_features, r)
        self._fast = (w, b, blk, r, nf, rem, self.out_features, self.in_features, self.is_conv1d, config.miss_dropout)

    # -- what the HF model sees --------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def extra_repr(self) -> str:
        ad = ", ".join(f"{n}:{c.variant}(r={c.r})" for n, c in self.adapter_config.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ad}]"

    # -- adapters ----------------------------------------------------------------------------------
    def add_adapter(
        self, name: str, config: BoneConfig, *, dtype: torch.dtype | None = None, initialize: bool = True
    ) -> None:
        """Add adapter ``name`` with ``config``'s variant and rank. Its block starts as ``init_weights`` says
        (zeros, or kaiming-uniform for ``init_weights=False``); ``initialize=False`` leaves zeros for a caller
        that copies trained blocks in (and so draws nothing from the random generator)."""
        config.check_layer_shape(self.in_features, self.out_features, "this layer")
        w = self.base_layer.weight
        if dtype is None:
            dtype = w.dtype
        blk = torch.zeros(config.block_shape(self.out_features), dtype=dtype, device=w.device)
        if initialize and config.init_weights is False:  # PEFT's init_weights=False: kaiming-uniform
            nn.init.kaiming_uniform_(blk, a=math.sqrt(5))
        self.bone_block[name] = nn.Parameter(blk)
        self.adapter_config[name] = config
        self._refresh(state=False)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise BoneError(f"adapter {name!r} is merged into this layer; unmerge before deleting it")
        if name in self.bone_block:
            del self.bone_block[name]
            self.adapter_config.pop(name, None)
        self.set_active([n for n in self._active if n != name])

    def set_active(self, names: Iterable[str]) -> None:
        self._active = tuple(n for n in names if n in self.bone_block)
        self._dense = any(self.adapter_config[n].variant == "bat" for n in self._active)
        self._refresh(state=False)

    def variant(self, name: str) -> str:
        return self.adapter_config[name].variant

    @property
    def block_params(self) -> dict[str, nn.Parameter]:
        """name -> block parameter, as a plain dict: the ParameterDict's own storage (never a copy, so never
        stale). Per-row routing looks up every row's adapter in every layer whenever a batch changes (64 rows
        x 224 layers on a 7B model); ``bone_block[name]`` goes through two Python-level ``__getattr__``s
        (~1.7 us each), a dict lookup costs ~0.05 us."""
        return self.bone_block._parameters  # type: ignore[return-value]  # (str keys: ParameterDict's own)

    def full_block(self, name: str) -> torch.Tensor:
        """The block in its Bone form (r, out) for bone/mini; the raw (out/r, r, r) block for Bat."""
        blk = self.block_params[name]
        if self.variant(name) == "mini":
            return BF.expand_mini(blk, self.out_features)
        return blk

    # -- dense weights -----------------------------------------------------------------------------
    def effective_weight(self, names: Iterable[str], weight: torch.Tensor | None = None) -> torch.Tensor:
        """The logical (out, in) weight with ``names`` applied in order, in the adapters' dtype."""
        w = self.base_layer.weight if weight is None else weight
        w = w.t() if self.is_conv1d else w
        for n in names:
            blk = self.full_block(n)
            w = w.to(torch.promote_types(w.dtype, blk.dtype))
            if self.variant(n) == "bat":
                w = BF.bat_weight(w, blk, conv1d=False)
            else:
                w = BF.bone_weight(w, blk, conv1d=False)
        return w

    # -- merge / unmerge ---------------------------------------------------------------------------
    def _merge_one(self, name: str, w: torch.Tensor, reverse: bool) -> torch.Tensor:
        """New stored-layout weight with adapter ``name`` merged (or unmerged); never writes to ``w``."""
        blk = self.full_block(name)
        calc = torch.promote_types(w.dtype, blk.dtype)
        if self.variant(name) == "bat":
            if reverse:
                new = BF.bat_unweight(w.to(calc), blk.to(calc), self.is_conv1d)
            else:
                new = BF.bat_weight(w.to(calc), blk.to(calc), self.is_conv1d)
            new = new.t() if self.is_conv1d else new
        else:
            new = BF.bone_weight(w.to(calc), blk.to(calc), self.is_conv1d, sign=-1.0 if reverse else 1.0)
        return new.to(w.dtype)

    @torch.no_grad()
    def merge(self, names: Iterable[str] | None = None, safe_merge: bool = False) -> list[str]:
        names = list(self._active if names is None else names)
        done = []
        for n in names:
            if n not in self.bone_block or n in self.merged_adapters:
                continue
            w = self.base_layer.weight
            new = self._merge_one(n, w.detach(), reverse=False)  # out-of-place: the base weight is untouched here
            if safe_merge and not torch.isfinite(new).all():
                raise BoneError(f"NaNs or infs in the merged weight; adapter {n!r} seems to be broken")
            w.data.copy_(new)
            self.merged_adapters.append(n)
            done.append(n)
        self._refresh()
        return done

    @torch.no_grad()
    def unmerge(self, count: int | None = None) -> None:
        """Undo the last ``count`` merges (all by default), LIFO so Bat compositions undo in order."""
        count = len(self.merged_adapters) if count is None else count
        for _ in range(count):
            n = self.merged_adapters[-1]
            w = self.base_layer.weight
            w.data.copy_(self._merge_one(n, w.detach(), reverse=True))
            self.merged_adapters.pop()
        self._refresh()

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = current_routing()
        if routing is not None:
            return row_forward(self, x, routing)
        fast = self._fast
        if fast is not None and torch.is_grad_enabled():
            w, b, blk, r, nf, rem, out, fin, conv1d, p = fast
            if (
                not conv1d
                and rem == 0
                and x.dtype == w.dtype
                and x.is_contiguous()
                and not (p and self.training)
                and not w.requires_grad
                and (b is None or not b.requires_grad)
                and (x.requires_grad or blk.requires_grad)
                and additive_default(x.device, x.numel() // fin)
                and not torch.is_autocast_enabled(x.device.type)
            ):
                # the common training step (one plain Bone adapter on nn.Linear) without the generic checks
                # below: ~28 projections a step, each saving a few dozen microseconds of Python
                return BoneAddFn.apply(x, w, b, blk)
        elif fast is not None:
            w, b, blk, r, nf, rem, out, fin, conv1d, p = fast
            if x.dtype == w.dtype and not (p and self.training) and x.is_contiguous():
                # decode hot path: base matmul, chunk sum (shared by sibling projections that read the same
                # input, e.g. q/k/v), one fused gemm-accumulate into the base output; nothing else.
                if conv1d:
                    y = x @ w if b is None else torch.addmm(b, x.view(-1, fin), w).view(*x.shape[:-1], out)
                else:
                    y = F.linear(x, w, b)
                s = BF.cached_chunk_sum(x, r)
                y.view(-1, out).addmm_(s, blk)
                return y
        active = self._active
        if not active or self._disabled or self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._dense:
            if len(active) == 1 and self._bat_trainable(x, active[0]):
                b = self.base_layer
                return BatTrainFn.apply(x, b.weight, b.bias, self.bone_block[active[0]])
            w = self.effective_weight(active)
            bias = self.base_layer.bias
            y = F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
            return y.to(x.dtype)
        return self._forward_bone(x, active, *args, **kwargs)

    def _forward_bone(self, x, active, *args, **kwargs):
        blocks = [self.full_block(n) for n in active]
        training_dropout = self.training and any(self.adapter_config[n].miss_dropout for n in active)
        if torch.is_grad_enabled() and self._plain and not training_dropout and self._trainable(x, blocks):
            return bone_train(x, self.base_layer.weight, self.base_layer.bias, self.is_conv1d, blocks)
        y = self.base_layer(x, *args, **kwargs)
        grad = torch.is_grad_enabled()
        for n, blk in zip(active, blocks):
            xin = x
            p = self.adapter_config[n].miss_dropout
            if p and self.training:
                xin = F.dropout(x, p, training=True)
            s = BF.chunk_sum(xin.to(blk.dtype), blk.shape[0])
            if not grad and y.dtype == blk.dtype and y.is_contiguous():
                # in place and fused: y += s @ B in one gemm call (beta=1), no temporary
                y.view(-1, self.out_features).addmm_(s.reshape(-1, s.shape[-1]), blk)
            else:
                y = y + (s @ blk).to(y.dtype)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _trainable(self, x: torch.Tensor, blocks: list[torch.Tensor]) -> bool:
        """The training Function applies: x in the base weight's dtype (blocks may be wider), no autocast,
        something needs a gradient. It picks fold / additive per shape itself (bone.train_path)."""
        w = self.base_layer.weight
        if w.dtype != x.dtype or torch.is_autocast_enabled(x.device.type):
            return False
        return x.requires_grad or w.requires_grad or any(b.requires_grad for b in blocks)

    def _bat_trainable(self, x: torch.Tensor, name: str) -> bool:
        if not torch.is_grad_enabled() or not self._plain or self.is_conv1d:
            return False
        w, blk = self.base_layer.weight, self.bone_block[name]
        if not (w.dtype == blk.dtype == x.dtype) or torch.is_autocast_enabled(x.device.type):
            return False
        return x.requires_grad or w.requires_grad or blk.requires_grad
