"""The adapter registry over HTTP: list, read one, delete (which also frees it in the serving engine)."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from app.deps import EngineDep, RegistryDep
from core.registry import AdapterInfo

log = logging.getLogger(__name__)
router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("")
def list_adapters(registry: RegistryDep) -> dict:
    return {"object": "list", "data": [info.model_dump(mode="json") for info in registry.list()]}


@router.get("/{name}", response_model=AdapterInfo)
def get_adapter(name: str, registry: RegistryDep) -> AdapterInfo:
    return registry.get(name)


@router.delete("/{name}")
def delete_adapter(name: str, registry: RegistryDep, engine: EngineDep) -> dict:
    registry.delete(name)  # 404 when absent; gone from listings and from every later request at once
    engine.evict_adapter(name)
    log.info("deleted adapter %r", name)
    return {"id": name, "object": "adapter", "deleted": True}
