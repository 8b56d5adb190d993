"""Checkpoint adapters (``training.publish_checkpoints``, named by ``AdapterName.checkpoint``): their removal
when the job is cancelled (a cancelled job publishes nothing). Shared by the worker and the API's cancel route."""

from __future__ import annotations

from core.errors import ServiceError
from core.jobs import Job
from core.jobstore import JobStore
from core.registry import AdapterRegistry


def unpublish_checkpoints(store: JobStore, registry: AdapterRegistry, job: Job) -> list[str]:
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
