"""``POST /adapters``: import a PEFT Bone or MiSS adapter (``adapter_config.json`` +
``adapter_model.safetensors``, multipart) into the registry.

Everything is checked before anything is published, so a bad adapter is refused here and never at first
use: the config with the bone library's own validation, the weights as safetensors only (never unpickled),
and every key and shape with the strict loader against the server's base model (a meta-device skeleton: no
weights, no touching the model the inference thread serves). The import lands in the caller's name.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from app.auth import PrincipalDep
from app.deps import JobCheckerDep, RegistryDep, SettingsDep
from core.errors import InvalidRequest
from core.names import AdapterName
from core.patterns import check_config_patterns
from core.quotas import check_adapter_count
from core.registry import CONFIG_FILE, WEIGHTS_FILE, AdapterInfo

log = logging.getLogger(__name__)
router = APIRouter(prefix="/adapters", tags=["adapters"])

MAX_CONFIG_BYTES = 1 << 20


@router.post(
    "",
    status_code=201,
    response_model=AdapterInfo,
    summary="Import a PEFT Bone/MiSS adapter",
    description="Multipart form: `name`, `adapter_config` (adapter_config.json, peft_type BONE or MISS), "
    "`adapter_model` (adapter_model.safetensors), optional `overwrite`. The adapter is "
    "checked key by key and shape by shape against the server's base model before it is "
    "published; a mismatch is a 422 naming the module.",
)
def import_adapter(
    name: Annotated[AdapterName, Form()],
    adapter_config: Annotated[UploadFile, File(description="adapter_config.json")],
    adapter_model: Annotated[UploadFile, File(description="adapter_model.safetensors")],
    registry: RegistryDep,
    settings: SettingsDep,
    checker: JobCheckerDep,
    principal: PrincipalDep,
    overwrite: Annotated[bool, Form()] = False,
) -> AdapterInfo:
    from bone import BoneConfig, validate_config_for_model
    from bone.adapter_files import NonFiniteTensorError, check_finite, check_tensors
    from bone.errors import BoneError

    check_adapter_count(registry, principal, name, settings.max_adapters_per_owner)
    config_dict = _read_config(adapter_config)
    check_config_patterns(config_dict, param="adapter_config")  # before any regex runs (RE2, bounded)
    try:
        config = BoneConfig.from_dict(config_dict)
    except BoneError as exc:
        raise InvalidRequest(
            f"adapter_config.json: {exc}", param="adapter_config", code="invalid_bone_config"
        ) from None
    if config.r > settings.max_r:
        raise InvalidRequest(
            f"adapter r={config.r} exceeds the server's limit of {settings.max_r} (BONE_MAX_R)", param="adapter_config"
        )
    if config.bias != "none":
        raise InvalidRequest(
            f"this adapter trains biases (bias={config.bias!r}), which live in the shared base model: "
            "it cannot be served next to other adapters",
            param="adapter_config",
            code="unservable_adapter",
        )
    if not overwrite and registry.exists(name):
        from core.errors import Conflict

        raise Conflict(
            f"adapter {name!r} already exists; pass overwrite=true to replace it", param="name", code="adapter_exists"
        )

    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=settings.data_dir))
    try:
        upload, weights = staging / "upload.safetensors", staging / WEIGHTS_FILE
        with open(upload, "wb") as out:
            shutil.copyfileobj(adapter_model.file, out, 1 << 20)
        tensors = _read_safetensors(upload)  # memory-mapped: written out below to another file, never over itself
        skeleton = checker._skeleton(settings.base_model)  # the base model's module shapes, on the meta device
        try:
            validate_config_for_model(skeleton, config)
            tensors = check_tensors(skeleton, config, tensors)  # every key and shape; names the module at fault
        except BoneError as exc:
            raise InvalidRequest(
                f"adapter does not fit base model {settings.base_model!r}: {exc}",
                param="adapter_model",
                code="adapter_mismatch",
            ) from None
        try:
            check_finite(tensors)
        except NonFiniteTensorError as exc:
            raise InvalidRequest(f"adapter_model: {exc}", param="adapter_model", code="non_finite_weights") from None
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
        fmt = "miss" if config.peft_type == "MISS" else "bone"
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_dict(fmt), indent=2, sort_keys=True) + "\n")
        info = registry.publish(
            name,
            staging,
            {
                "base_model": settings.base_model,
                "bone": config.to_dict(fmt),
                "lineage": {"imported": True, "peft_type": config.peft_type},
            },
            overwrite=overwrite,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("imported adapter %r (%s, r=%d, %d bytes)", name, config.peft_type, config.r, info.size_bytes)
    return info


def _read_config(upload: UploadFile) -> dict:
    raw = upload.file.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidRequest(f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes", param="adapter_config")
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"adapter_config.json is not valid JSON: {exc}", param="adapter_config") from None
    if not isinstance(value, dict):
        raise InvalidRequest("adapter_config.json must hold a JSON object", param="adapter_config")
    return value


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidRequest(
            f"adapter_model is not a readable safetensors file (pickled checkpoints are refused): {exc}",
            param="adapter_model",
        ) from None
