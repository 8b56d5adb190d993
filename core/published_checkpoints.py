"""Checkpoint adapters (``training.publish_checkpoints``, named by ``AdapterName.checkpoint``): their removal
when the job is cancelled (a cancelled job publishes nothing). Shared by the worker and the API's cancel route."""

from __future__ import annotations

from typing import Any, Protocol

from core.errors import ServiceError
from core.jobs import Job
from core.registry import AdapterInfo


# What it needs of the job store and the registry: the worker passes the whole ones, the cancel route the
# caller's views of them (core.access).
class _Checkpoints(Protocol):
    def checkpoints(self, job_id: str) -> list[dict[str, Any]]: ...


class _Registry(Protocol):
    def get(self, name: str) -> AdapterInfo: ...

    def delete(self, name: str) -> None: ...


def unpublish_checkpoints(store: _Checkpoints, registry: _Registry, job: Job) -> list[str]:
    """Delete the checkpoint adapters this job published (only those whose metadata names this job)."""
    removed = []
    for entry in store.checkpoints(job.id):
        name = entry.get("adapter")
        try:
            if name and registry.get(name).job_id == job.id:
                registry.delete(name)
                removed.append(name)
        except ServiceError:
            continue
    return removed
