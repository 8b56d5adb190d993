"""Which modules of a model a ``BoneConfig`` targets. Pure: reads the model, never changes it, so it also
works on a model built on the meta device (only names and shapes are looked at)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

from torch import nn

from .config import BoneConfig, check_r
from .errors import BoneConfigError
from .layer import BoneLinear
from .linear_types import SUPPORTED_TYPES, Conv1D
from .tree import iter_modules

# Regex targets match with RE2 when it is installed (the service always has it, and accepts only patterns RE2
# compiles: core/patterns.py): linear time, so no pattern can freeze the caller. Without it, or for a construct
# RE2 lacks, a library user's own pattern falls back to Python's ``re``.
try:
    import re2 as _re2
except ImportError:  # pragma: no cover - optional for library users
    _re2 = None


@lru_cache(maxsize=256)
def compile_target_regex(pattern: str):
    if _re2 is not None:
        options = _re2.Options()
        options.log_errors = False
        try:
            return _re2.compile(pattern, options)
        except _re2.error:
            pass
    return re.compile(pattern)


# Default targets per `config.model_type` (same choice as PEFT's LoRA/Bone mapping).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpt": ["Wqkv"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
}

# Container names under which transformer blocks are numbered (PEFT's COMMON_LAYERS_PATTERN).
COMMON_LAYERS_PATTERN = ("layers", "h", "block", "blocks", "layer")


@dataclass(frozen=True)
class Target:
    name: str  # module path inside the HF model, as before wrapping (no ".base_layer")
    in_features: int
    out_features: int
    is_conv1d: bool


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in, out, is_conv1d) of a Linear, a Conv1D, or a BoneLinear wrapping one."""
    base: Any = getattr(module, "base_layer", module)
    if isinstance(base, Conv1D):
        fin, fout = base.weight.shape
        return int(fin), int(fout), True
    return int(base.in_features), int(base.out_features), False


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_TYPES) or isinstance(module, BoneLinear)


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in iter_modules(model) if _is_linear(m)]


def _matches(spec, key: str) -> bool:
    if isinstance(spec, str):
        return compile_target_regex(spec).fullmatch(key) is not None
    return any(key == t or key.endswith("." + t) for t in spec)


def _layer_index_ok(config: BoneConfig, key: str) -> bool:
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern
    if patterns is None:
        m = re.match(r".*\.[^.]*\.(\d+)\.", key)
    else:
        m = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            m = re.match(rf".*\.{re.escape(p)}\.(\d+)\.", key)
            if m:
                break
    layers = cast(list[int], config.layers_to_transform)  # BoneConfig made it a list
    return m is not None and int(m.group(1)) in layers


def resolve_target_spec(model: nn.Module, config: BoneConfig):
    """The effective target_modules (list or regex), applying per-architecture defaults for None."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise BoneConfigError(
            f"target_modules is None and there are no default targets for model_type {model_type!r}; "
            "set target_modules explicitly",
            "target_modules",
        )
    return DEFAULT_TARGETS[model_type]


def find_targets(model: nn.Module, config: BoneConfig) -> list[Target]:
    """Every module the config targets, in model order. Raises BoneConfigError when nothing matches,
    when a matched module is not a Linear/Conv1D, or when its shape does not fit the variant."""
    spec = resolve_target_spec(model, config)
    output_layer: Any = None
    if spec == "all-linear" and hasattr(model, "get_output_embeddings"):
        try:
            output_layer = cast(Any, model).get_output_embeddings()  # a transformers PreTrainedModel
        except (AttributeError, NotImplementedError):
            output_layer = None
    mts = config.modules_to_save or []
    targets: list[Target] = []
    for name, module in iter_modules(model):
        if spec == "all-linear":
            if not _is_linear(module) or module is output_layer or name.split(".")[-1] == "lm_head":
                continue
        elif not _matches(spec, name):
            continue
        if config.exclude_modules is not None and _matches(config.exclude_modules, name):
            continue
        if mts and _matches(mts, name):
            continue  # a fully trained copy already covers it
        if not _layer_index_ok(config, name):
            continue
        if not _is_linear(module):
            raise BoneConfigError(
                f"target module {name!r} is a {type(module).__name__}; Bone supports only torch.nn.Linear and "
                "transformers' Conv1D",
                "target_modules",
            )
        fin, fout, conv = linear_shape(module)
        targets.append(Target(name, fin, fout, conv))
    if not targets:
        names = linear_module_names(model)
        leaves = sorted({n.split(".")[-1] for n in names})
        raise BoneConfigError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + (
                f" (layers_to_transform={config.layers_to_transform!r})"
                if config.layers_to_transform is not None
                else ""
            )
            + f". Its Linear/Conv1D modules are named: {', '.join(leaves) or '(none)'}"
            + (f"; e.g. {', '.join(names[:4])}" if names else ""),
            "target_modules",
        )
    check_shapes(targets, config)
    return targets


def check_shapes(targets: list[Target], config: BoneConfig) -> None:
    for t in targets:
        config.check_layer_shape(t.in_features, t.out_features, f"module {t.name!r}")


def find_modules_to_save(model: nn.Module, config: BoneConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    found = [n for n, _ in iter_modules(model) if _matches(config.modules_to_save, n)]
    # keep outermost matches only (a match inside another match is covered by it)
    found = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    missing = [t for t in config.modules_to_save if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        raise BoneConfigError(f"modules_to_save {missing!r} matched no module of the model", "modules_to_save")
    return found


def validate_config_for_model(model: nn.Module, config: BoneConfig) -> None:
    """Raise BoneConfigError if ``config`` cannot be applied to ``model``; never modifies the model."""
    if not isinstance(config, BoneConfig):
        raise BoneConfigError(f"expected a BoneConfig, got {type(config).__name__}")
    check_r(config.r)  # a dataclass field can be reassigned after construction
    find_targets(model, config)
    find_modules_to_save(model, config)
