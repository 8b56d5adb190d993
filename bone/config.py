"""``BoneConfig``: PEFT's Bone fields and defaults, validated at construction, read/written as
``adapter_config.json`` in PEFT's BONE layout, and able to read PEFT's MISS configs.

The one schema of a Bone adapter: the service's request model (``core.jobs.BoneSpec``) is built from it and
validates through it, and the layers receive the config object itself. Imports no torch, so the API can use it
without loading the tensor stack."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

from .errors import BoneCheckpointError, BoneConfigError

# The adapter name that stands for "no adapter": per-row routing's key for the base model; no adapter takes it.
BASE_ADAPTER = "__base__"

CONFIG_NAME = "adapter_config.json"

# PEFT's TaskType values; PEFT rejects anything else for `task_type`, so do we.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
INIT_WEIGHTS = (True, False, "bat", "mini")
Bias = Literal["none", "all", "bone_only"]
BIAS_VALUES: tuple[str, ...] = get_args(Bias)
PEFT_TYPES = ("BONE", "MISS")
DEFAULT_R = 64  # PEFT's default
MIN_R = 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_r(r: Any) -> int:
    """The one rule for ``r``: a positive int (bool is not one). Raises ``BoneConfigError`` naming ``r``."""
    if not _is_int(r) or r < MIN_R:
        raise BoneConfigError(f"`r` must be a positive integer, got {r!r}", "r")
    return r


def check_init_weights(value: Any) -> bool | Literal["bat", "mini"]:
    """``True`` / ``False`` / ``"bat"`` / ``"mini"`` (strings in any case); raises naming ``init_weights``."""
    if isinstance(value, str) and value.lower() in ("bat", "mini"):
        return cast(Literal["bat", "mini"], value.lower())
    if isinstance(value, bool):
        return value
    raise BoneConfigError(f"`init_weights` must be True, False, 'bat' or 'mini', got {value!r}", "init_weights")


def _check_names(value: Any, field_name: str, allow_regex: bool) -> Any:
    """Normalise a target-like field: None, a regex string (full match) or a list of module-name suffixes."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            raise BoneConfigError(
                f"`{field_name}` must be a list of module names, got the string {value!r}", field_name
            )
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as exc:
                raise BoneConfigError(f"`{field_name}` is not a valid regular expression: {exc}", field_name) from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        if not all(isinstance(v, str) and v for v in items):
            raise BoneConfigError(f"`{field_name}` must contain only non-empty strings, got {items!r}", field_name)
        # PEFT turns the list into a set; a sorted list keeps it JSON-able and deterministic.
        return sorted(set(items))
    raise BoneConfigError(
        f"`{field_name}` must be None, a string or a list of strings, got {type(value).__name__}", field_name
    )


@dataclass
class BoneConfig:
    """Configuration of one Bone / Bat (/ MiSS-mini) adapter. Field names and defaults follow PEFT 0.18.1.

    ``init_weights``: ``True`` = Bone, zero blocks (adapter starts as the identity); ``False`` = Bone with
    kaiming-uniform blocks (for tests); ``"bat"`` = Bat (weight-dependent blocks, zero init); ``"mini"`` =
    MiSS-mini (``(r, mini_r)`` block tiled along the output), only storable in the MiSS format.
    """

    r: int = DEFAULT_R
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | Literal["bat", "mini"] = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    bias: Bias = "none"
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # MiSS-only fields (read from MISS configs, written only in the MISS format).
    mini_r: int = 1
    miss_dropout: float = 0.0
    peft_type: str = field(default="BONE")

    def __post_init__(self) -> None:
        check_r(self.r)
        self.init_weights = check_init_weights(self.init_weights)
        self.target_modules = _check_names(self.target_modules, "target_modules", allow_regex=True)
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules", allow_regex=True)
        if self.exclude_modules == "all-linear":
            raise BoneConfigError("`exclude_modules` cannot be 'all-linear'", "exclude_modules")
        self.modules_to_save = _check_names(self.modules_to_save, "modules_to_save", allow_regex=False)

        ltt = self.layers_to_transform
        if ltt is not None:
            layers: Any = [ltt] if _is_int(ltt) else ltt  # user input, checked next
            if not isinstance(layers, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in layers):
                raise BoneConfigError(
                    "`layers_to_transform` must be a non-negative int or a list of them, "
                    f"got {self.layers_to_transform!r}",
                    "layers_to_transform",
                )
            self.layers_to_transform = sorted(set(layers))
        lp = self.layers_pattern
        if lp is not None:
            if isinstance(lp, str):
                lp = [lp] if lp else []
            if not isinstance(lp, (list, tuple)) or not all(isinstance(p, str) and p for p in lp):
                raise BoneConfigError(
                    f"`layers_pattern` must be a string or a list of strings, got {lp!r}", "layers_pattern"
                )
            self.layers_pattern = lp[0] if len(lp) == 1 else (list(lp) or None)
        if isinstance(self.target_modules, str):
            if self.layers_to_transform is not None:
                raise BoneConfigError(
                    "`layers_to_transform` cannot be used when `target_modules` is a str.", "layers_to_transform"
                )
            if self.layers_pattern is not None:
                raise BoneConfigError(
                    "`layers_pattern` cannot be used when `target_modules` is a str.", "layers_pattern"
                )

        bias = self.bias
        if isinstance(bias, str) and bias.lower().endswith("_only"):
            bias = "bone_only"  # MiSS writes "MiSS_only"; same meaning
        if bias not in BIAS_VALUES:
            raise BoneConfigError(f"`bias` must be one of {BIAS_VALUES}, got {self.bias!r}", "bias")
        self.bias = bias

        if self.task_type is not None:
            tt = getattr(self.task_type, "value", self.task_type)
            if tt not in TASK_TYPES:
                raise BoneConfigError(
                    f"`task_type` must be None or one of {TASK_TYPES}, got {self.task_type!r}", "task_type"
                )
            self.task_type = tt
        for name in ("base_model_name_or_path", "revision"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise BoneConfigError(f"`{name}` must be a string or None, got {type(v).__name__}", name)
        if not isinstance(self.inference_mode, bool):
            raise BoneConfigError(f"`inference_mode` must be a bool, got {self.inference_mode!r}", "inference_mode")
        if not _is_int(self.mini_r) or self.mini_r <= 0:
            raise BoneConfigError(f"`mini_r` must be a positive integer, got {self.mini_r!r}", "mini_r")
        if (
            isinstance(self.miss_dropout, bool)
            or not isinstance(self.miss_dropout, (int, float))
            or not 0.0 <= self.miss_dropout < 1.0
        ):
            raise BoneConfigError(
                f"`miss_dropout` must be a float in [0, 1), got {self.miss_dropout!r}", "miss_dropout"
            )
        self.miss_dropout = float(self.miss_dropout)
        if self.peft_type not in PEFT_TYPES:
            raise BoneConfigError(f"`peft_type` must be 'BONE' or 'MISS', got {self.peft_type!r}", "peft_type")

    # -- variants ---------------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """``"bone"``, ``"bat"`` or ``"mini"``: which forward / merge rule the adapter uses."""
        if self.init_weights == "bat":
            return "bat"
        if self.init_weights == "mini":
            return "mini"
        return "bone"

    def replace(self, **changes: Any) -> BoneConfig:
        return dataclasses.replace(self, **changes)

    # -- shapes -----------------------------------------------------------------------------------
    def block_shape(self, out_features: int) -> tuple[int, ...]:
        """Shape of this adapter's block on a layer with ``out_features`` outputs (as stored on disk)."""
        if self.variant == "bat":
            return (out_features // self.r, self.r, self.r)
        if self.variant == "mini":
            return (self.r, self.mini_r)
        return (self.r, out_features)

    def check_layer_shape(self, in_features: int, out_features: int, where: str) -> None:
        """Raise ``BoneConfigError`` if the variant cannot tile a layer of this shape (``where`` names it)."""
        r = check_r(self.r)
        if self.variant == "bat" and (in_features % r or out_features % r):
            raise BoneConfigError(
                f"Bat (init_weights='bat') needs in_features and out_features divisible by r={r}, but {where} "
                f"has in_features={in_features}, out_features={out_features}",
                "r",
            )
        if self.variant == "mini" and out_features % self.mini_r:
            raise BoneConfigError(
                f"MiSS-mini needs out_features divisible by mini_r={self.mini_r}, but {where} has "
                f"out_features={out_features}",
                "mini_r",
            )

    # -- adapter_config.json ----------------------------------------------------------------------
    def to_dict(self, format: str = "bone") -> dict[str, Any]:
        """The config as PEFT writes it (PEFT's field names). ``format`` is ``"bone"`` or ``"miss"``."""
        fmt = format.lower()
        if fmt not in ("bone", "miss"):
            raise BoneConfigError(f"format must be 'bone' or 'miss', got {format!r}", "format")
        d: dict[str, Any] = {
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "exclude_modules": self.exclude_modules,
            "inference_mode": self.inference_mode,
            "init_weights": self.init_weights,
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "modules_to_save": self.modules_to_save,
            "peft_type": fmt.upper(),
            "r": self.r,
            "revision": self.revision,
            "target_modules": self.target_modules,
            "task_type": self.task_type,
        }
        if fmt == "miss":
            d["mini_r"] = self.mini_r
            d["miss_dropout"] = self.miss_dropout
            if self.bias == "bone_only":
                d["bias"] = "MiSS_only"
        else:
            # PEFT's BONE has no mini variant and no dropout; writing them there would silently lose them.
            if self.init_weights == "mini":
                raise BoneConfigError(
                    "init_weights='mini' exists only in MiSS; save with format='miss'", "init_weights"
                )
            if self.miss_dropout:
                raise BoneConfigError("miss_dropout exists only in MiSS; save with format='miss'", "miss_dropout")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BoneConfig:
        """Build from a PEFT ``adapter_config.json`` dict (BONE or MISS).

        Unknown keys (peft_version, ...) are ignored."""
        if not isinstance(d, dict):
            raise BoneConfigError(f"adapter config must be a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type", "BONE")
        peft_type = getattr(peft_type, "value", peft_type)
        if not isinstance(peft_type, str) or peft_type.upper() not in PEFT_TYPES:
            raise BoneConfigError(f"`peft_type` must be 'BONE' or 'MISS', got {peft_type!r}", "peft_type")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and k != "peft_type"}
        return cls(**kwargs, peft_type=peft_type.upper())

    def to_json_string(self, format: str = "bone", extra: dict[str, Any] | None = None) -> str:
        d = self.to_dict(format)
        if extra:
            d.update(extra)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def save_pretrained(
        self, directory: str | os.PathLike, format: str = "bone", extra: dict[str, Any] | None = None
    ) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            f.write(self.to_json_string(format, extra))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> BoneConfig:
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise BoneCheckpointError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise BoneCheckpointError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(d)
