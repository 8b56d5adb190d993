"""Fixtures for the worker tests: the embedded base model loaded once, jobs created on the real Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from core.base_model import LoadedBaseModel, load_base_model
from core.jobs import STORED, BoneSpec, Job, RecordsDataset, TrainingSpec, dataset_summary
from core.jobstore import JobStore
from core.settings import Settings
from worker import context


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tiny models gain nothing from a second thread, and on 2 shared CPU cores OpenMP's spin-waiting
    made a forward/backward ~60x slower (4 s instead of 0.06 s) while other work ran. One thread also makes
    timings steadier. Restored after each module, so other packages keep their own setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def base(tmp_path_factory, shared_models_dir: Path) -> LoadedBaseModel:
    """The embedded model, read once per session. Tests that change it must work on a copy."""
    data_dir = tmp_path_factory.mktemp("worker-base")
    (data_dir / "models").symlink_to(shared_models_dir, target_is_directory=True)
    return load_base_model("embedded", Settings(data_dir=data_dir), device=torch.device("cpu"))


@pytest.fixture
def store(redis_conn) -> JobStore:
    return JobStore(redis_conn)


@pytest.fixture
def task_settings(settings: Settings):
    """Settings the task reads (instead of the environment's), reset afterwards."""
    context.use_settings(settings)
    yield settings
    context.use_settings(None)


@pytest.fixture
def make_job(store: JobStore) -> Callable[..., Job]:
    def make(
        records: list[dict[str, Any]] | None = None,
        *,
        adapter_name: str = "test-adapter",
        dataset: dict[str, Any] | None = None,
        bone: dict[str, Any] | None = None,
        overwrite: bool = False,
        **training: Any,
    ) -> Job:
        summary = dataset if dataset is not None else dataset_summary(RecordsDataset(records=records))
        # As a record read back from the store: a dataset name of a shape the API refuses still gets to the
        # worker, which must refuse it by the same rule.
        job = Job.model_validate(
            {
                "id": Job.new_id(),
                "adapter_name": adapter_name,
                "base_model": "embedded",
                "dataset": summary,
                "bone": BoneSpec(**(bone or {})),
                "training": TrainingSpec(**training),
                "overwrite": overwrite,
            },
            context=STORED,
        )
        store.create(job, records=records)
        return job

    return make
