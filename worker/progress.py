"""Progress of a running job, written where clients read it: every step and message as an event
(``GET /jobs/{id}/events``) and, at most every ``interval`` seconds plus on phase changes and the last step,
into the job record (``progress`` with phase, epoch and ETA; ``metrics.train_loss``) so polling
``GET /jobs/{id}`` stays cheap and Redis writes stay bounded."""

from __future__ import annotations

import time
from typing import Any

from core.errors import Conflict
from core.jobstore import JobStore
from worker.data import Cancelled


class ProgressReporter:
    def __init__(self, store: JobStore, job_id: str, *, interval: float = 0.5) -> None:
        self.store = store
        self.job_id = job_id
        self.interval = interval
        self.progress: dict[str, Any] = dict(store.get(job_id).progress.model_dump())
        self._last_write = 0.0
        self._first_step: tuple[int, float] | None = None  # (step, time) of this attempt's first step
        self._metrics: dict[str, float | None] = {}
        self._last_step_at: float | None = None  # step time = time between two steps' reports

    # --- what the training loop calls --------------------------------------------------------------------
    def on_step(
        self, step: int, total: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, **extra: Any
    ) -> None:
        """``extra``: more of the step for its event (co-training: the job's share of the step time, its rows
        and the group's, whom it trained with); ``share_s`` also goes into the record's metrics."""
        self.store.add_event(
            self.job_id,
            "step",
            "",
            step=step,
            total_steps=total,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_s,
            **extra,
        )
        if "share_s" in extra:
            self._metrics["step_share_s"] = extra["share_s"]
        now = time.monotonic()
        if self._last_step_at is not None:
            self.store.record_training_step(tokens_per_s, now - self._last_step_at)
        self._last_step_at = now
        if self._first_step is None:
            self._first_step = (step - 1, now)  # the clock starts at the end of this attempt's first step
        first, since = self._first_step
        done_here = step - first - 1
        eta = (now - since) / done_here * (total - step) if done_here > 0 else None
        self.progress.update(step=step, total_steps=total, eta_s=None if eta is None else round(eta, 1))
        self._metrics["train_loss"] = loss
        if now - self._last_write >= self.interval or step == total:
            self._write()

    def on_event(self, kind: str, message: str = "", **data: Any) -> None:
        if kind == "phase":  # not an event: the job record shows the current phase
            self.phase(data["phase"])
            return
        if kind == "epoch":
            self.progress["epoch"] = data["epoch"]
        if kind == "eval":
            self._metrics.update(eval_loss=data["eval_loss"], eval_token_accuracy=data["eval_token_accuracy"])
        self.store.add_event(self.job_id, kind, message, **data)

    def phase(self, name: str) -> None:
        if self.progress.get("phase") != name:
            self.progress["phase"] = name
            self._write()

    def should_stop(self) -> bool:
        return self.store.cancel_requested(self.job_id)

    def _write(self) -> None:
        self._last_write = time.monotonic()
        try:
            job = self.store.get(self.job_id)
            self.store.update(self.job_id, progress=self.progress, metrics={**job.metrics, **self._metrics})
        except Conflict:
            raise Cancelled() from None  # the record went final under us (cancelled by someone): stop
