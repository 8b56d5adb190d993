"""A folder of the registry's adapters as vLLM reads LoRA adapters, kept in sync.

Every Bone adapter is exactly a LoRA adapter of rank r (``bone.export``), so a user who outgrows this engine can
serve the same adapters with vLLM. vLLM reads a LoRA adapter from a folder holding ``adapter_config.json`` and
``adapter_model.safetensors`` in PEFT's layout, named either on the command line
(``--lora-modules NAME=PATH``) or found at request time by its filesystem resolver
(``VLLM_LORA_RESOLVER_CACHE_DIR``: ``<dir>/<model name>/``, accepted when ``peft_type`` is ``LORA`` and
``base_model_name_or_path`` equals the served model). So the folder is ``<dir>/<adapter name>/``, one per adapter.

``sync_folder`` writes what is missing or changed (by the adapter's sha256), and with ``prune`` removes folders
of adapters that are gone. It only ever removes or replaces folders that carry its own ``bone_export.json``
stamp, so pointing it at a folder that also holds other adapters is safe. Each folder is written next to its
final place and renamed into it, so vLLM never reads a half-written adapter.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["STAMP_FILE", "unzip", "VLLM_LORA_RANKS", "SyncResult", "vllm_max_lora_rank", "serve_command", "sync_folder"]

STAMP_FILE = "bone_export.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# vLLM's --max-lora-rank accepts only these values (its LoRAConfig), and preallocates buffers of that rank for
# every LoRA slot: the smallest value that holds every adapter is the one to pass.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LEFTOVER_AGE_S = 3600.0


@dataclass
class SyncResult:
    directory: Path
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name → why it could not be exported
    ranks: dict[str, int] = field(default_factory=dict)  # every adapter now in the folder → its LoRA rank

    @property
    def adapters(self) -> list[str]:
        return sorted(self.ranks)


def unzip(data: bytes) -> dict[str, bytes]:
    """A LoRA download (a zip of the adapter folder) as ``sync_folder``'s ``fetch`` returns it: file name -> bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def vllm_max_lora_rank(ranks: list[int] | tuple[int, ...]) -> int:
    """The value of vLLM's ``--max-lora-rank`` that serves adapters of these ranks."""
    need = max(ranks, default=1)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; an adapter here has rank {need}")


def serve_command(base_model: str, result: SyncResult) -> str:
    """The ``vllm serve`` line that serves every adapter in the folder, each under its registry name."""
    modules = [f"{name}={result.directory / name}" for name in result.adapters]
    words = [
        "vllm",
        "serve",
        base_model,
        "--enable-lora",
        "--max-lora-rank",
        str(vllm_max_lora_rank(list(result.ranks.values()))),
        "--max-loras",
        str(max(1, min(len(modules), 8))),
    ]
    if modules:
        words += ["--lora-modules", *modules]
    return " ".join(shlex.quote(w) for w in words)


def _stamp(folder: Path) -> dict | None:
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _rank(folder: Path) -> int:
    return int(json.loads((folder / "adapter_config.json").read_text())["r"])


def _write(directory: Path, name: str, files: Mapping[str, bytes], sha256: str, base_model: str | None) -> int:
    missing = [f for f in ADAPTER_FILES if f not in files]
    if missing:
        raise ValueError(f"the export lacks {', '.join(missing)}")
    config = json.loads(files["adapter_config.json"])
    if config.get("peft_type") != "LORA":
        raise ValueError(f"not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    if base_model is not None:  # vLLM's resolver compares this with the name the model is served under
        config["base_model_name_or_path"] = base_model
    stamp = json.loads(files[STAMP_FILE]) if STAMP_FILE in files else {}
    stamp.update(adapter=name, sha256=sha256, base_model_name_or_path=config.get("base_model_name_or_path"))
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (staging / "adapter_model.safetensors").write_bytes(files["adapter_model.safetensors"])
        (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the adapter from a vLLM running as another user
        final = directory / name
        if final.exists():  # swap: the old folder leaves in one rename, the new one arrives in the next
            retired = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=directory))
            os.replace(final, retired / name)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return int(config["r"])


def sync_folder(
    directory: str | os.PathLike,
    listing: Mapping[str, str],
    fetch: Callable[[str], Mapping[str, bytes]],
    *,
    base_model: str | None = None,
    prune: bool = False,
) -> SyncResult:
    """Bring ``directory`` in line with ``listing`` (adapter name → sha256). ``fetch(name)`` returns the LoRA
    export's files (name → bytes) and may raise: that adapter is reported in ``failed`` and the rest go on.
    ``base_model`` overrides ``base_model_name_or_path`` (the name vLLM serves the base under)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    result = SyncResult(root)
    for name, sha256 in sorted(listing.items()):
        if "/" in name or name.startswith("."):  # the registry's names never are; a folder name must not climb
            result.failed[name] = "not usable as a folder name"
            continue
        stamp = _stamp(root / name)
        wanted_base = base_model or (stamp or {}).get("base_model_name_or_path")
        if stamp and stamp.get("sha256") == sha256 and stamp.get("base_model_name_or_path") == wanted_base:
            result.unchanged.append(name)
            result.ranks[name] = _rank(root / name)
            continue
        if (root / name).exists() and stamp is None:
            result.failed[name] = f"{root / name} exists and was not written by bone-server; left as it is"
            continue
        try:
            result.ranks[name] = _write(root, name, fetch(name), sha256, base_model)
        except Exception as exc:  # noqa: BLE001 - one adapter's failure is reported, the others still sync
            result.failed[name] = str(exc) or type(exc).__name__
            if stamp is not None:  # what is there is another version of the adapter: vLLM must not serve it
                shutil.rmtree(root / name, ignore_errors=True)
                result.removed.append(name)
            continue
        result.written.append(name)
    if prune:
        for folder in sorted(root.iterdir()):
            if folder.is_dir() and folder.name not in listing and not folder.name.startswith("."):
                if _stamp(folder) is not None:
                    shutil.rmtree(folder)
                    result.removed.append(folder.name)
    _remove_leftovers(root)
    return result


def _remove_leftovers(root: Path) -> None:
    """Staging and retired folders of a writer killed between its writes and its renames. Only old ones: a
    young one may belong to a sync running right now (the server's and a user's CLI may share a folder)."""
    now = time.time()
    for folder in root.iterdir():
        if folder.name.startswith(".") and folder.is_dir() and now - folder.stat().st_mtime > LEFTOVER_AGE_S:
            if _stamp(folder) is not None or any(_stamp(child) is not None for child in folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
