"""Progress of a running job, written where clients read it: every step as an event (``GET /jobs/{id}/events``)
and, at most every ``interval`` seconds plus on the last step, into the job record (``progress``,
``metrics.train_loss``) so polling ``GET /jobs/{id}`` stays cheap and Redis writes stay bounded."""

from __future__ import annotations

import time

from core.errors import Conflict
from core.jobstore import JobStore
from worker.train import Cancelled


class ProgressReporter:
    def __init__(self, store: JobStore, job_id: str, *, interval: float = 0.5) -> None:
        self.store = store
        self.job_id = job_id
        self.interval = interval
        self._last_write = 0.0

    def on_step(self, step: int, total: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float) -> None:
        self.store.add_event(self.job_id, "step", "", step=step, total_steps=total, loss=loss, lr=lr,
                             grad_norm=grad_norm, tokens_per_s=tokens_per_s)
        now = time.monotonic()
        if now - self._last_write < self.interval and step != total:
            return
        self._last_write = now
        try:
            job = self.store.get(self.job_id)
            self.store.update(self.job_id, progress={"step": step, "total_steps": total},
                              metrics={**job.metrics, "train_loss": loss})
        except Conflict:
            raise Cancelled() from None  # the record went final under us (cancelled by someone): stop

    def should_stop(self) -> bool:
        return self.store.cancel_requested(self.job_id)
