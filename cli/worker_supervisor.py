"""``bone-server up``'s worker, kept alive: restarted with backoff whenever it exits, however it died.

The supervisor is a thread of the ``up`` process; its ``status()`` is reported by ``/readyz`` (``worker``)
and every exit and restart is logged. A worker that ran for ``stable_after_s`` before exiting starts the
backoff again from 1 s; one that keeps dying right away waits up to ``BONE_RECONNECT_MAX_BACKOFF_S``.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from core.backoff import Backoff

log = logging.getLogger(__name__)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class WorkerSupervisor:
    def __init__(
        self, command: Sequence[str], env: dict[str, str], *, max_backoff_s: float, stable_after_s: float = 60.0
    ) -> None:
        self.command, self.env = list(command), env
        self.stable_after_s = stable_after_s
        self._backoff = Backoff(max_backoff_s)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._started_at = 0.0
        self.restarts = 0
        self.last_exit: str | None = None
        self.state = "starting"
        self._thread = threading.Thread(target=self._watch, name="bone-worker-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> WorkerSupervisor:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._proc = subprocess.Popen(self.command, env=self.env)
            self._started_at = time.monotonic()
            self.state = "running"

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self._proc
            # start() spawns before this thread runs, and a spawn is skipped only once stopping is set
            assert proc is not None
            code = proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - self._started_at >= self.stable_after_s:
                self._backoff.reset()
            delay = self._backoff.next()
            self.restarts += 1
            self.last_exit = describe_exit(code)
            self.state = "restarting"
            log.warning(
                "worker (pid %d) %s; restarting it in %.1f s (restart %d)",
                proc.pid,
                self.last_exit,
                delay,
                self.restarts,
            )
            if self._stopping.wait(delay):
                return
            self._spawn()
            log.info("worker restarted (pid %s)", self.pid)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts, "last_exit": self.last_exit}

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker (SIGTERM: it finishes or hands back its job) and stop restarting it."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
            self.state = "stopped"
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
