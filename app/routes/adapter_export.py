"""Adapter export and exact composition.

- ``GET /adapters/{name}/download?format=bone|miss|lora``: a zip of the adapter in PEFT's layout —
  as trained (BONE), as current PEFT's MiSS, or as a standard LoRA adapter that vLLM, LoRAX and PEFT's LoRA
  serve unchanged (exact for Bone; Bat through a truncated SVD at the smallest rank meeting ``?tolerance=``,
  its error in ``bone_export.json``). Every download's ``base_model_name_or_path`` resolves on the
  downloader's side (see ``core.base_model.exported_base_model_name``).
- ``POST /adapters/{name}/compose``: store ``Σ wᵢ Bᵢ`` of Bone adapters as a new adapter ``name``, with its
  lineage in the metadata (exact: a Bone update is linear in its block).
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import ConfigDict, Field, field_validator

from app.auth import PrincipalDep
from app.deps import EngineDep, RegistryDep, SettingsDep
from app.generation import check_mix
from bone import BoneConfig, BoneConfigError, combine_bone_adapters, to_lora
from bone.adapter_files import NonFiniteTensorError, check_finite, to_format, write_adapter_dir
from bone.export import DEFAULT_BAT_TOLERANCE
from core.access import Adapters
from core.base_model import exported_base_model_name
from core.errors import Conflict, InvalidRequest
from core.names import AdapterName
from core.quotas import check_adapter_count
from core.registry import AdapterInfo
from core.requests import RequestModel
from core.settings import EMBEDDED_BASE_MODEL

router = APIRouter(prefix="/adapters", tags=["adapters"])

MAX_COMPOSE = 16


def _read(registry: Adapters, name: str) -> tuple[AdapterInfo, BoneConfig, dict]:
    tensors, info = registry.verified_tensors(name)  # 404 when absent, refused when corrupt
    config = BoneConfig.from_dict(registry.adapter_config(name))
    return info, config, tensors


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for filename, data in files.items():
            archive.writestr(filename, data)
    return buffer.getvalue()


def _folder_bytes(write) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        write(folder)
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def export_adapter(
    registry: Adapters,
    engine,
    settings,
    name: str,
    fmt: str,
    lora_rank: int | None,
    tolerance: float | None = None,
) -> tuple[bytes, dict]:
    info, config, tensors = _read(registry, name)
    if info.base_model != engine.base.name:
        raise Conflict(
            f"adapter {name!r} was trained on {info.base_model!r}; this server's base model is {engine.base.name!r}",
            param="adapter",
            code="base_model_mismatch",
        )
    # What from_pretrained resolves on the downloader's side (a hub id, a folder; the embedded base: the
    # folder `bone-server models export-embedded` writes), not the server's own name for its base.
    config.base_model_name_or_path = exported_base_model_name(info.base_model, settings)
    config.task_type = config.task_type or "CAUSAL_LM"  # what this server serves; PEFT's Auto classes need it
    report: dict[str, Any] = {
        "adapter": name,
        "format": fmt,
        "sha256": info.sha256,
        "base_model": info.base_model,
        "base_model_name_or_path": config.base_model_name_or_path,
    }
    if info.base_model == EMBEDDED_BASE_MODEL:
        report["base_model_how"] = f"bone-server models export-embedded {config.base_model_name_or_path}"
    if fmt == "lora":
        # the served base model gives the shapes (and, for Bat, the weights its update depends on)
        try:
            export = to_lora(engine.base.model, config, tensors, bat_rank=lora_rank, tolerance=tolerance)
        except BoneConfigError as exc:
            if exc.field != "tolerance":
                raise
            raise InvalidRequest(str(exc), param="tolerance") from None
        report.update(
            rank=export.rank,
            exact=export.exact,
            max_relative_error=export.max_relative_error,
            relative_errors=export.relative_errors,
        )
        files = _folder_bytes(export.save)
    else:
        config_dict = config.to_dict(fmt)
        files = _folder_bytes(lambda folder: write_adapter_dir(folder, config_dict, to_format(tensors, fmt)))
    files["bone_export.json"] = json.dumps(report, indent=2).encode()
    return _zip(files), report


@router.get(
    "/{name}/download",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "the adapter folder, zipped"}},
)
async def download_adapter(
    name: str,
    registry: RegistryDep,
    engine: EngineDep,
    settings: SettingsDep,
    format: Literal["bone", "miss", "lora"] = "bone",
    lora_rank: int | None = Query(None, ge=1, le=4096, description="Bat → LoRA only: rank of the truncated SVD"),
    tolerance: float | None = Query(
        None,
        gt=0,
        lt=1,
        description=(
            "Bat → LoRA only: the smallest rank whose relative error ‖ΔW − BA‖/‖ΔW‖ is at most "
            f"this in every module (default {DEFAULT_BAT_TOLERANCE:g} when lora_rank is not given)"
        ),
    ),
) -> Response:
    data, report = await run_in_threadpool(
        export_adapter, registry, engine, settings, name, format, lora_rank, tolerance
    )
    headers = {"Content-Disposition": f'attachment; filename="{name}-{format}.zip"'}
    if format == "lora":
        headers["X-Bone-Lora-Exact"] = "true" if report["exact"] else "false"
        headers["X-Bone-Lora-Max-Relative-Error"] = f"{report['max_relative_error']:.3g}"
    return Response(data, media_type="application/zip", headers=headers)


class ComposeRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    adapters: dict[AdapterName, float] = Field(
        min_length=1,
        max_length=MAX_COMPOSE,
        description='source adapter name → weight, e.g. {"a": 0.7, "b": 0.3}; |weight| <= 100',
    )
    overwrite: bool = False

    @field_validator("adapters")
    @classmethod
    def _weights(cls, value: dict[AdapterName, float]) -> dict[AdapterName, float]:
        return check_mix(value)  # the same rules as a per-request mix


def _compose(registry: Adapters, engine, name: AdapterName, request: ComposeRequest) -> AdapterInfo:
    if registry.exists(name) and not request.overwrite:
        raise Conflict(
            f"adapter {name!r} already exists; pass overwrite=true to replace it", param="name", code="adapter_exists"
        )
    sources = [(source, *_read(registry, source), weight) for source, weight in request.adapters.items()]
    base_models = {info.base_model for _, info, _, _, _ in sources}
    if len(base_models) > 1:
        raise Conflict(
            f"the adapters were trained on different base models ({', '.join(sorted(base_models))}); "
            "a sum is exact only on one base",
            param="adapters",
            code="base_model_mismatch",
        )
    try:
        config, summed = combine_bone_adapters([(src, cfg, tensors, w) for src, _, cfg, tensors, w in sources])
    except BoneConfigError as exc:  # Bat, biases, mixed r: a request problem, named on the request's field
        raise InvalidRequest(str(exc), param="adapters") from None
    try:
        check_finite(summed)  # finite sources, bounded weights: only a source near float32's edge gets here
    except NonFiniteTensorError as exc:
        raise InvalidRequest(
            f"the weighted sum is not finite: {exc}", param="adapters", code="non_finite_weights"
        ) from None
    with tempfile.TemporaryDirectory() as folder:
        write_adapter_dir(folder, config.to_dict("bone"), summed)
        info = registry.publish(
            name,
            Path(folder),
            {
                "base_model": base_models.pop(),
                "bone": config.to_dict("bone"),
                "lineage": {
                    "operation": "weighted_sum",
                    "adapters": [{"name": src, "weight": w, "sha256": info.sha256} for src, info, _, _, w in sources],
                },
            },
            overwrite=request.overwrite,
        )
    engine.evict_adapter(name)  # an overwritten name must not be served from the old weights
    return info


@router.post("/{name}/compose", status_code=201, response_model=AdapterInfo)
async def compose_adapter(
    name: AdapterName,
    body: ComposeRequest,
    registry: RegistryDep,
    engine: EngineDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> AdapterInfo:
    """Store the exact weighted sum of Bone adapters (same base model, same r) as adapter ``name``."""
    await run_in_threadpool(check_adapter_count, registry, principal, name, settings.max_adapters_per_owner)
    return await run_in_threadpool(_compose, registry, engine, name, body)
