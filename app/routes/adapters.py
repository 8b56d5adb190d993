"""The adapter registry over HTTP: list, read one, delete (which also frees it in the serving engine)."""

from __future__ import annotations

import logging

import redis
from fastapi import APIRouter, Query

from app.deps import EngineDep, RedisDep, RegistryDep
from core.evals import EvalStore, LatestEval
from core.registry import AdapterInfo

log = logging.getLogger(__name__)
router = APIRouter(prefix="/adapters", tags=["adapters"])


@router.get("")
def list_adapters(registry: RegistryDep,
                  limit: int = Query(100, ge=1, le=1000, description="page size"),
                  after: str | None = Query(None, description="name of the last adapter of the previous page")) -> dict:
    """Adapters by name, one page at a time (``has_more`` says whether another page follows)."""
    infos = registry.list()
    if after is not None:
        infos = [info for info in infos if info.name > after]  # names are unique and sorted
    page = infos[:limit]
    return {"object": "list", "data": [info.model_dump(mode="json") for info in page], "has_more": len(infos) > limit}


class AdapterView(AdapterInfo):
    latest_eval: LatestEval | None = None  # its latest POST /evals result, while it is still this version


@router.get("/{name}", response_model=AdapterView)
def get_adapter(name: str, registry: RegistryDep, conn: RedisDep) -> AdapterView:
    info = registry.get(name)
    try:
        latest = EvalStore(conn).latest(name, sha256=info.sha256)
    except redis.RedisError:
        latest = None  # the registry answers without Redis; only the eval summary is missing then
    return AdapterView(**info.model_dump(), latest_eval=latest)


@router.delete("/{name}")
def delete_adapter(name: str, registry: RegistryDep, engine: EngineDep) -> dict:
    registry.delete(name)  # 404 when absent; gone from listings and from every later request at once
    engine.evict_adapter(name)
    log.info("deleted adapter %r", name)
    return {"id": name, "object": "adapter", "deleted": True}
