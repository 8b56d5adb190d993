"""Publishing what training wrote: the check every published adapter passes (finite weights) and the
checkpoint publisher the training loop reports each checkpoint to (one process or rank 0 of many)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from core.access import may_publish_over
from core.errors import ServiceError
from core.jobs import Job
from core.jobstore import JobStore
from core.registry import AdapterRegistry
from core.settings import Settings


class CheckpointPublisher:
    """Records each checkpoint for ``GET /jobs/{id}/checkpoints`` and, with ``publish_checkpoints``, publishes
    it as adapter ``<adapter_name>-step-<n>`` (a checkpoint folder holds a PEFT-layout adapter)."""

    def __init__(self, store: JobStore, settings: Settings, job: Job, config) -> None:
        self.store, self.settings, self.job, self.config = store, settings, job, config

    def wrap(self, on_event):
        def handle(kind: str, message: str = "", **data):
            if kind == "checkpoint":
                data["adapter"] = self.publish(data["step"], Path(data.pop("path")), data)
            on_event(kind, message, **data)

        return handle

    def publish(self, step: int, path: Path, data: dict) -> str | None:
        name = None
        if self.job.training.publish_checkpoints:
            name = self.job.adapter_name.checkpoint(step)
            check_publishable(path)
            registry = AdapterRegistry.from_settings(self.settings)
            ours = registry.exists(name) and registry.get(name).job_id == self.job.id  # an earlier attempt's
            registry.publish(
                name,
                path,
                overwrite=self.job.overwrite or ours,
                metadata={
                    "base_model": self.job.base_model,
                    "bone": self.config.to_dict(),
                    "job_id": self.job.id,
                    "owner": self.job.owner,
                    "metrics": {k: v for k, v in data.items() if k.endswith("loss")} | {"steps": step},
                },
                may_replace=partial(may_publish_over, self.job.owner, self.job.id),
            )
        self.store.add_checkpoint(
            self.job.id,
            step,
            {
                "created_at": time.time(),
                "adapter": name,
                "train_loss": data.get("train_loss"),
                "eval_loss": data.get("eval_loss"),
            },
        )
        return name


def check_publishable(adapter_dir: Path) -> None:
    """Never publish weights holding NaN or infinity (a diverged run): the job fails naming the tensor."""
    from bone.adapter_files import NonFiniteTensorError, check_finite, read_adapter_dir

    _, tensors = read_adapter_dir(adapter_dir)
    try:
        check_finite(tensors)
    except NonFiniteTensorError as exc:
        raise ServiceError(
            f"training diverged, nothing was published: {exc} (try a lower training.learning_rate)",
            code="non_finite_weights",
        ) from None
