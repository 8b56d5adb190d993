"""The heavy things the lifespan builds, as ``Annotated`` dependencies for the routes.

Each reads ``request.app.state``; tests override any of them with ``app.dependency_overrides``.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request
from rq import Queue

from app.engine import InferenceEngine
from app.job_checks import JobChecker
from core.jobstore import JobStore
from core.registry import AdapterRegistry
from core.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_jobstore(request: Request) -> JobStore:
    return request.app.state.jobstore


def get_registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


def get_job_checker(request: Request) -> JobChecker:
    return request.app.state.job_checker


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
QueueDep = Annotated[Queue, Depends(get_queue)]
JobStoreDep = Annotated[JobStore, Depends(get_jobstore)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
JobCheckerDep = Annotated[JobChecker, Depends(get_job_checker)]
