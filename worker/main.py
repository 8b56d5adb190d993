"""The worker process: a forking RQ ``Worker`` on the training queue, with the base model preloaded.

``bone-server worker`` calls ``run_worker(get_settings())``. The parent process loads the base model once
(on the CPU) and then forks one work-horse per job; every work-horse inherits the model without reading it
from disk again (see ``worker.model_cache`` for why, and for the CUDA-and-fork rule).

Dead work is noticed quickly, so no job stays ``running`` forever: the process training a job keeps a
heartbeat key alive (worker/heartbeat.py) and a janitor thread here (core/janitor.py, also in the API)
re-queues a running job whose heartbeat expired; the next attempt resumes from its last checkpoint. RQ's
own signals only feed that path:
* a work-horse that dies (OOM killer, segfault) is reported by RQ at once -> its heartbeat is dropped and
  the cause recorded, so the janitor's next pass (seconds) re-queues it naming the cause;
* a whole worker that dies is noticed by the janitor within ~heartbeat TTL + interval (20 s by default);
  RQ's own abandoned-job report comes 90+ s later and is only logged.

Redis going away does not end the worker: whether it is down at start or lost under a running worker, the
worker waits (1 s, doubling up to ``BONE_RECONNECT_MAX_BACKOFF_S``), builds a fresh RQ ``Worker`` and goes on;
a job still running in a work-horse then finishes before another is taken. Only a stop request (SIGTERM,
SIGINT, RQ's shutdown command) or ``burst`` ends ``run_worker``.

Fleets (core/fleet.py): ``queues`` (``bone-server worker --queues cpu,gpu-24g``) are the RQ queues served, in
priority order (default: ``BONE_QUEUE_NAME``); an ``Advert`` thread keeps this worker's device, memory and
queues in Redis for ``GET /workers`` and ``GET /queues``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from core.settings import Settings

log = logging.getLogger(__name__)


class MaintenanceAtDebug(logging.Filter):
    """RQ logs each registry clean-up at INFO. We run it every few seconds (so a dead worker's job is noticed
    fast), which would put a line in the log every 10-15 s forever: shown at DEBUG only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and str(record.msg).startswith("Worker %s: cleaning registries"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def maintenance_interval(settings: Settings) -> int:
    return max(5, settings.worker_ttl_s // 3)


def run_worker(settings: Settings, *, burst: bool = False, queues: Sequence[str] | None = None) -> bool:
    """Serve the training queues until stopped (or, with ``burst``, until they are empty). Returns RQ's result."""
    # Before anything imports torch.cuda: ask NVML whether a GPU exists, which does not initialise CUDA in
    # this (parent) process; the work-horses forked from it can then still use CUDA.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

    import redis
    from rq import Queue, Worker

    from core.backoff import Backoff
    from core.base_model import pick_device
    from core.fleet import check_device
    from core.janitor import Janitor
    from worker import context, model_cache

    device = pick_device(settings)
    check_device(device, f"device {settings.device} (--device / BONE_DEVICE)")  # DeviceUnavailable: one line
    context.use_settings(settings)  # forked work-horses inherit it, so API flags and tests reach the task
    log.info("preloading base model %r (jobs will train on %s)", settings.base_model, device.type)
    model_cache.preload(settings.base_model, settings, device)

    names = list(dict.fromkeys(queues or [settings.queue_name]))
    described = describe_device(settings, device) | {"queues": names}
    janitor = None
    backoff = Backoff(settings.reconnect_max_backoff_s)
    try:
        while True:
            worker = None
            try:
                conn = redis.Redis.from_url(settings.redis_url)
                conn.ping()
                worker = Worker(
                    [Queue(name, connection=conn) for name in names],
                    connection=conn,
                    worker_ttl=settings.worker_ttl_s,
                    maintenance_interval=maintenance_interval(settings),
                    exception_handlers=[_abandoned_job_handler],
                    work_horse_killed_handler=_work_horse_killed,
                )
                log.info(
                    "worker %s listening on queues %s at %s (worker TTL %d s, maintenance every %d s)",
                    worker.name,
                    ",".join(names),
                    settings.redis_url,
                    settings.worker_ttl_s,
                    maintenance_interval(settings),
                )
                worker.log.addFilter(MaintenanceAtDebug())
                context.use_worker_name(worker.name)  # recorded on each job it starts
                advert = Advert(settings, worker.name, described).start()
                # Started before the first fork; work-horses inherit no threads, so it only ever runs in this parent.
                if janitor is None and not burst:
                    janitor = Janitor(settings, clean_workdirs=True).start()
                backoff.reset()
                try:
                    worked = worker.work(burst=burst, with_scheduler=False, logging_level=settings.log_level.upper())
                finally:
                    advert.stop()
                if burst or _stop_was_requested(worker):
                    return worked
                cause = "its loop ended without a stop request (Redis lost during maintenance?)"
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if burst:
                    raise
                cause = f"Redis unreachable: {exc}"
            # RQ leaves its own SIGTERM handler on the worker it built; while waiting, a stop is just an exit.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _wait_for_work_horse(worker)
            delay = backoff.next()
            log.warning("worker lost its Redis (%s); reconnecting in %.1f s", cause, delay)
            time.sleep(delay)
    finally:
        if janitor is not None:
            janitor.stop()


def _stop_was_requested(worker) -> bool:
    """A SIGTERM/SIGINT or RQ's stop command (not an outage) ended the worker's loop."""
    return bool(getattr(worker, "_stop_requested", False) or getattr(worker, "_shutdown_requested_date", None))


def _wait_for_work_horse(worker) -> None:
    """A job still running in a work-horse when Redis went away finishes (or fails) before this worker takes
    another: two trainings must never share the device. Its heartbeat tells the janitor if it died."""
    pid = getattr(worker, "horse_pid", 0) if worker is not None else 0
    if not pid:
        return
    log.warning("waiting for the running job's process %d to end before reconnecting", pid)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


# --- what this worker advertises (core/fleet.py) ------------------------------------------------------------------
def describe_device(settings: Settings, device) -> dict[str, Any]:
    """Device, device count and memory, found without initialising CUDA in this (forking) parent process."""
    import torch

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
        "cpus": os.cpu_count(),
        "memory_bytes": _host_memory(),
        "max_num_processes": settings.max_num_processes,
        "started_at": time.time(),
    }
    if device.type == "cuda":
        info["gpus"] = torch.cuda.device_count()  # NVML-based (see run_worker): no CUDA context here
        gpus = _gpu_memory()
        info.update(gpus)
        if device.index is not None and device.index < len(gpus.get("gpu_memory_bytes", [])):
            # a pinned worker (one per GPU): its own GPU's model and memory, free memory at start-up
            index = device.index
            info.update(
                gpu_name=gpus["gpu_names"][index],
                device_memory_bytes=gpus["gpu_memory_bytes"][index],
                device_free_bytes=gpus["gpu_free_bytes"][index],
            )
    return info


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpu_memory() -> dict[str, Any]:
    """GPU model and memory per GPU from nvidia-smi (NVML); empty when it is not there."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [line.split(",") for line in out.strip().splitlines() if line.count(",") >= 2]
    return {
        "gpu_names": [r[0].strip() for r in rows],
        "gpu_memory_bytes": [int(float(r[1])) * 1024 * 1024 for r in rows],
        "gpu_free_bytes": [int(float(r[2])) * 1024 * 1024 for r in rows],
    }


class Advert:
    """Keeps ``bone:worker:<name>`` alive while this worker runs (a thread of the parent process)."""

    def __init__(self, settings: Settings, name: str, info: dict[str, Any]) -> None:
        import redis

        self.name, self.info, self.ttl = name, info, settings.worker_ttl_s
        self.conn = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bone-advert", daemon=True)

    def start(self) -> Advert:
        from core.fleet import advertise

        advertise(self.conn, self.name, self.info, self.ttl)  # at once: GET /workers shows it from the start
        self._thread.start()
        return self

    def stop(self) -> None:
        from core.fleet import withdraw

        self._stop.set()
        self._thread.join(5)
        try:
            withdraw(self.conn, self.name)
        except Exception:  # noqa: BLE001 - it expires by itself
            pass
        self.conn.close()

    def _run(self) -> None:
        from core.fleet import advertise

        while not self._stop.wait(max(1.0, self.ttl / 3)):
            try:
                advertise(self.conn, self.name, self.info, self.ttl)
            except Exception as exc:  # noqa: BLE001 - Redis blips: keep trying
                log.warning("worker advert failed: %s", exc)


def _work_horse_killed(job, pid: int, status: int, rusage) -> None:
    """RQ's hook for a work-horse that exited without finishing its job (killed by a signal, usually OOM)."""
    signal_no = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    cause = (
        f"killed by signal {signal_no}" + (" (out of memory?)" if signal_no == 9 else "")
        if signal_no
        else f"exited with status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}"
    )
    log.error("work-horse %d of job %s %s", pid, job.id, cause)
    record_death(job.connection, job.id, f"the training process died: {cause}")


def record_death(conn, job_id: str, reason: str) -> None:
    """The process of a running job is known dead: write the cause and drop its heartbeat, so the janitor
    re-queues it on its next pass (naming the cause). Not re-queued right here: RQ marks this RQ job failed
    after the hook returns, which would overwrite a job enqueued again under the same id."""
    from core.errors import ServiceError
    from core.jobs import JobStatus
    from core.jobstore import JobStore
    from worker.tasks import mark_failed

    store = JobStore(conn)
    try:
        job = store.get(job_id)
        if job.status is JobStatus.RUNNING:
            store.transition(job_id, [JobStatus.RUNNING], attempt=job.attempts, error=reason)
            store.clear_heartbeat(job_id)
            store.add_event(job_id, "error", reason, attempt=job.attempts)
        elif job.status is JobStatus.QUEUED:
            mark_failed(conn, job_id, reason)  # died before the task started: nothing would run it again
    except ServiceError as exc:  # e.g. NotFound: an RQ job that is not one of ours
        log.warning("job %s: could not record its death: %s", job_id, exc)


def _abandoned_job_handler(job, exc_type, exc_value, traceback) -> bool:
    """RQ calls worker exception handlers from registry maintenance with ``AbandonedJobError`` for a job whose
    worker stopped heart-beating, 90+ s after the fact. By then the janitor has re-queued (or failed) it,
    and the job may be running again elsewhere: so only log it. Other exceptions never reach here from our
    task, which records its own failures."""
    from rq.exceptions import AbandonedJobError

    if exc_type is AbandonedJobError or isinstance(exc_value, AbandonedJobError):
        log.warning("RQ reports job %s abandoned by its worker; the janitor handles retries", job.id)
    return True  # let RQ's own bookkeeping continue
