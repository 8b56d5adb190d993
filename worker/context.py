"""What a worker process tells the tasks it runs (and the work-horses forked from it): the settings to use
(``run_worker(settings)`` and tests override the environment's) and the RQ worker's name, recorded on the jobs it
starts. Its own module because the training task, the node task and the evaluation task all read it."""

from __future__ import annotations

from core.settings import Settings, get_settings

_settings_override: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """Make tasks in this process (and work-horses forked from it) use ``settings`` instead of the
    environment's: ``run_worker(settings)`` and tests call this."""
    global _settings_override
    _settings_override = settings


_worker_name: str | None = None


def use_worker_name(name: str | None) -> None:
    """The RQ worker name recorded on the jobs this process (and its work-horses) start (``job.worker``)."""
    global _worker_name
    _worker_name = name


def worker_name() -> str | None:
    return _worker_name


def current_settings() -> Settings:
    return _settings_override or get_settings()
