"""The shared base model: resolve a name to something ``from_pretrained`` can load, and load it.

``embedded`` (the default) is a small Llama-architecture model with a byte-level tokenizer, built
deterministically from a config the first time it is needed and written to ``<data_dir>/models/``. After
that it is loaded through the same ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
path as any Hugging Face id or local directory, so the embedded default exercises the real loading code.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.errors import InvalidRequest
from core.paths import base_model_not_allowed, is_hub_id, local_model_dir
from core.settings import EMBEDDED_BASE_MODEL, Settings

if TYPE_CHECKING:  # transformers is imported when a model loads, not with this module
    from transformers import PreTrainedTokenizerBase

EMBEDDED_DIR_NAME = "embedded-llama-v1"

# Roles are written as plain text markers: the tokenizer is byte-level, so nothing needs special tokens
# beyond end-of-sequence, which ends every turn (and is what generation stops on).
EMBEDDED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable-character map, which the ByteLevel pre-tokenizer and decoder expect."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level_tokenizer():
    """One token per byte (ids 0-255) plus three special tokens: every string round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _gpt2_byte_chars()
    vocab = {byte_chars[b]: b for b in range(256)}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        model_max_length=2048,
    )
    tokenizer.chat_template = EMBEDDED_CHAT_TEMPLATE
    return tokenizer


def build_embedded_model(target: Path) -> Path:
    """Write the embedded base model to ``target`` (atomically: a concurrent builder loses the rename race)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if (target / "config.json").is_file():
        return target
    tokenizer = _byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=264,  # 259 used, rounded up to a multiple of 8
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            pass  # someone else built it first; theirs is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_base_model(name: str, settings: Settings, *, param: str = "base_model") -> str:
    """Map a base-model name to what ``from_pretrained`` takes. The server's own base model is the operator's
    choice and taken as configured; any other name follows core/paths.py: an absolute model folder inside
    the allowed directories, or a hub id that names nothing local. One message for every refusal."""
    if name == EMBEDDED_BASE_MODEL:
        return str(build_embedded_model(settings.models_dir / EMBEDDED_DIR_NAME))
    if name == settings.base_model:
        return _operator_model(name, settings, param)
    local = local_model_dir(name, [settings.data_dir, *settings.allowed_model_dirs])
    if local is not None:
        return str(local)
    if not name.startswith("/") and is_hub_id(name):
        return name
    raise base_model_not_allowed(name, param)


def _operator_model(name: str, settings: Settings, param: str) -> str:
    """BONE_BASE_MODEL itself: a hub id, or a local folder given by the operator (relative to where they start
    the server, like any path in the environment)."""
    path = Path(name).expanduser()
    if not path.exists():
        return name
    if not (path / "config.json").is_file():
        raise InvalidRequest(f"the server's base model {name!r} has no config.json (BONE_BASE_MODEL)", param=param)
    return str(path.resolve())


def exported_base_model_name(name: str, settings: Settings) -> str:
    """``base_model_name_or_path`` for an adapter a user downloads: what ``from_pretrained`` resolves on their
    side. A hub id stays as it is; a local base is its folder; the embedded base (no hub id, built here) is
    the relative folder ``bone-server models export-embedded embedded-llama-v1`` writes."""
    if name == EMBEDDED_BASE_MODEL:
        return EMBEDDED_DIR_NAME
    looks_local = name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()
    return str(Path(name).expanduser().resolve()) if looks_local else name


def pick_device(settings: Settings) -> torch.device:
    if settings.device.startswith("cuda"):
        return torch.device(settings.device)  # "cuda" or a pinned "cuda:N"
    if settings.device == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class LoadedBaseModel:
    name: str  # as the user spells it ("embedded", an id, a path)
    source: str  # what from_pretrained loaded
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``BONE_DTYPE`` → a torch dtype. auto: bf16 on CUDA; fp32 on CPU, where bf16 matmuls are slow and fp32
    keeps CPU runs reproducible. A torch dtype is taken as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_base_model(
    name: str,
    settings: Settings,
    device: torch.device | None = None,
    dtype: str | torch.dtype = "auto",
) -> LoadedBaseModel:
    """Load the base once, directly in its compute dtype (the server passes ``settings.dtype``; training keeps
    auto), so a 7B model never exists on the host in fp32 first.

    transformers (5.x) always builds the model on the meta device and fills it from memory-mapped safetensors,
    each tensor cast as it is read (``low_cpu_mem_usage`` is no longer an option there: it is how it loads).
    When the file's dtype is ``dtype`` the parameters are the mapped file itself (a private, copy-on-write
    mapping): host memory is one copy, as shared page cache, and ``.to(device)`` reads it from there. Loading
    fp32 and casting afterwards held fp32 plus the cast copy, ~3.4x the bf16 file (bench/load_memory.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base_model(name, settings)
    device = device or pick_device(settings)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=settings.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=resolve_dtype(dtype, device), trust_remote_code=settings.trust_remote_code
    )
    model.to(device)  # type: ignore[arg-type]  # transformers' decorator types .to() for its own model only
    model.eval()
    return LoadedBaseModel(name=name, source=source, model=model, tokenizer=tokenizer, device=device)


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The token ids that end a generation: the model's generation config's and the tokenizer's (either may
    name one id, a list of them, or none)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value if v is not None)
    return frozenset(ids)
