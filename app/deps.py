"""The heavy things the lifespan builds, as ``Annotated`` dependencies for the routes.

Each reads ``request.app.state``; tests override any of them with ``app.dependency_overrides``. The job and
evaluation stores, the registry and the file store come as the caller sees them (``core.access``): a user key
sees only its own owner's things, and another owner's id answers 404 exactly like a missing one.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request
from rq import Queue

from app.auth import PrincipalDep
from app.engine import InferenceEngine
from app.job_checks import JobChecker
from core.access import OwnedAdapters, OwnedFiles, OwnedJobs, OwnedRecords
from core.evals import Evaluation
from core.files import FileStore
from core.settings import Settings


# The dependencies only read app.state and wrap it (no I/O), so they are coroutines: a plain `def` would cost a
# thread-pool round trip each.
async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


async def get_queue(request: Request) -> Queue:
    return request.app.state.queue


async def get_jobstore(request: Request, principal: PrincipalDep) -> OwnedJobs:
    return OwnedJobs(request.app.state.jobstore, principal)


async def get_evalstore(request: Request, principal: PrincipalDep) -> OwnedRecords[Evaluation]:
    return OwnedRecords(request.app.state.evalstore, principal)


async def get_registry(request: Request, principal: PrincipalDep) -> OwnedAdapters:
    return OwnedAdapters(request.app.state.registry, principal)


async def get_files(request: Request, principal: PrincipalDep) -> OwnedFiles:
    return OwnedFiles(FileStore.from_settings(request.app.state.settings), principal)


async def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def get_job_checker(request: Request) -> JobChecker:
    return request.app.state.job_checker


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
JobStoreDep = Annotated[OwnedJobs, Depends(get_jobstore)]
EvalStoreDep = Annotated[OwnedRecords[Evaluation], Depends(get_evalstore)]
RegistryDep = Annotated[OwnedAdapters, Depends(get_registry)]
FilesDep = Annotated[OwnedFiles, Depends(get_files)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
JobCheckerDep = Annotated[JobChecker, Depends(get_job_checker)]
