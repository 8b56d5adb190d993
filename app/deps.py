"""The heavy things the lifespan builds, as ``Annotated`` dependencies for the routes.

Each reads ``request.app.state``; tests override any of them with ``app.dependency_overrides``. The job
store, the registry and the job checker come scoped to the caller (``core.auth``): a user key sees only its
own owner's jobs and adapters, and another owner's id answers 404 exactly like a missing one.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request
from rq import Queue

from app.auth import PrincipalDep
from app.engine import InferenceEngine
from app.job_checks import JobChecker
from core.auth import OwnedJobStore, OwnedRegistry, Principal, check_name_free
from core.errors import InvalidRequest, NotFound
from core.jobstore import JobStore
from core.registry import AdapterRegistry
from core.settings import Settings


# The dependencies only read app.state and wrap it (no I/O), so they are coroutines: a plain `def` would cost a
# thread-pool round trip each, five per POST /jobs, which showed in the load profile.
async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


async def get_queue(request: Request) -> Queue:
    return request.app.state.queue


async def get_jobstore(request: Request, principal: PrincipalDep) -> JobStore:
    store = request.app.state.jobstore
    return OwnedJobStore(store, principal) if principal.authenticated else store


async def get_registry(request: Request, principal: PrincipalDep) -> AdapterRegistry:
    registry = request.app.state.registry
    return OwnedRegistry(registry, principal) if principal.authenticated else registry


async def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def get_job_checker(request: Request, principal: PrincipalDep) -> JobChecker:
    checker = request.app.state.job_checker
    return _OwnedJobChecker(checker, principal) if principal.authenticated else checker


class _OwnedJobChecker:
    """The job checker plus the ownership rule: a job may not (over)write an adapter name another owner holds."""

    def __init__(self, checker: JobChecker, principal: Principal) -> None:
        self._checker, self._principal = checker, principal

    def __getattr__(self, name: str):
        return getattr(self._checker, name)

    def check(self, body, *args, **kwargs):
        check_name_free(self._checker.registry, body.adapter_name, self._principal, for_job=True)
        for param in ("dataset", "validation_dataset"):  # a job may train only on its owner's uploaded files
            file_id = getattr(getattr(body, param, None), "file_id", None)
            if file_id is not None:
                self._check_file(file_id, f"{param}.file_id")
        return self._checker.check(body, *args, **kwargs)

    def _check_file(self, file_id: str, param: str) -> None:
        from core.files import FileStore

        try:
            info = FileStore(self._checker.settings.files_dir).get(file_id)
        except NotFound:
            return  # the checker reports a missing file itself
        if not self._principal.can_see(info.owner):
            raise InvalidRequest(f"no file with id {file_id!r}", param=param, code="not_found")  # as for a missing id


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
JobStoreDep = Annotated[JobStore, Depends(get_jobstore)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
JobCheckerDep = Annotated[JobChecker, Depends(get_job_checker)]
