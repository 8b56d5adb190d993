"""Prometheus metrics (prometheus-client), served at ``/metrics``.

- HTTP: latency histogram by route template, method and status (middleware below).
- Inference engine: generated tokens, time to first token, batch sizes, decode step time by batch size, the
  batch bound, adapter cache hits / misses / evictions / load time, resident adapters — ``app.engine.engine``,
  ``app.engine.scheduler`` and ``app.engine.adapter_pool`` update these objects.
- Queue and jobs: read from Redis at scrape time (queue depth, jobs by status).
- Workers: the training loop pushes its latest figures through Redis (hash ``bone:metrics:training``:
  tokens/s, step time, steps; hash ``bone:metrics:cotrain``: co-training groups, the last group's size, rows
  and member steps) and this process exports them at scrape time, so one scrape target covers the whole
  deployment and workers need no open port.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from starlette.responses import Response

from core.jobstore import COTRAIN_METRICS, STATUS_COUNTS
from core.jobstore import TRAINING_METRICS as TRAINING_METRICS_KEY

HTTP_LATENCY = Histogram(
    "bone_http_request_duration_seconds",
    "HTTP request latency",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
GENERATED_TOKENS = Counter("bone_generated_tokens_total", "tokens generated", ["adapter_kind"])
GENERATION_TOKENS_PER_S = Gauge(
    "bone_generation_tokens_per_second", "engine tokens/s over the last busy window (>= 0.5 s)"
)
TIME_TO_FIRST_TOKEN = Histogram(
    "bone_time_to_first_token_seconds",
    "from request arrival to its first token",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Continuous batching: rows join and leave between steps, so the batch size is observed once per decode step.
CONTINUOUS_BATCHING = Gauge(
    "bone_engine_continuous_batching",
    "1 for the mode the engine runs in: joins (rows join a running batch) or drain (newcomers wait for it to empty)",
    ["mode"],
)
BATCH_SIZE = Histogram("bone_engine_batch_size", "rows per engine decode step", buckets=(1, 2, 4, 8, 16, 32, 64))
# Labelled by the batch size rounded down to a power of two, so the labels stay few whatever the batch bound.
ENGINE_STEP_SECONDS = Histogram(
    "bone_engine_step_seconds",
    "one decode step (forward, sampling, stops) by rows in the batch: 4 = 4-7 rows, 64+ = 64 or more",
    ["rows"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
STEP_ROWS_LABELS = ("1", "2", "4", "8", "16", "32", "64+")
ENGINE_MAX_BATCH_SIZE = Gauge(
    "bone_engine_max_batch_size", "rows that may decode together (BONE_MAX_BATCH_SIZE, or the device's default)"
)
ENGINE_KV_BUDGET_TOKENS = Gauge(
    "bone_engine_kv_budget_tokens",
    "KV cache tokens running rows may reserve together (BONE_KV_BUDGET_TOKENS, or its default)",
)
ENGINE_KV_TOKENS_RESERVED = Gauge(
    "bone_engine_kv_tokens_reserved",
    "KV cache tokens reserved by the admitted rows (each its prompt + max_new_tokens)",
)
SHARE_DEFERRALS = Counter(
    "bone_engine_share_deferrals_total",
    "waiting requests held back (once each) because their key held its share of the batch rows or KV budget "
    "while another key waited (BONE_MAX_RUNNING_PER_KEY / BONE_MAX_KV_TOKENS_PER_KEY)",
)
ENGINE_KV_RELAYOUTS = Counter(
    "bone_engine_kv_relayouts_total",
    "times a layer's KV buffer was laid out again (its live columns copied): no room on the right (append), "
    "for a wider newcomer or more rows (join); a decode step or a join that fits copies no existing column",
    ["reason"],
)
PREFILL_CHUNKS = Counter("bone_engine_prefill_chunks_total", "chunks of long prompts prefilled between decode steps")
BATCH_WORKING_BYTES = Gauge(
    "bone_engine_batch_working_bytes",
    "bytes the running batch takes beyond the resident adapters (row index tensors, per-layer scratch, dense Bat "
    "weights, stacked one-row blocks), counted against BONE_ADAPTER_CACHE_BYTES",
)
ADAPTER_CACHE_HITS = Counter("bone_adapter_cache_hits_total", "requests whose adapter was resident on the device")
ADAPTER_CACHE_MISSES = Counter(
    "bone_adapter_cache_misses_total", "requests whose adapter had to be loaded (from the CPU tier or the registry)"
)
ADAPTER_CACHE_EVICTIONS = Counter("bone_adapter_cache_evictions_total", "adapters evicted from the device pool")
ADAPTER_LOAD_SECONDS = Histogram(
    "bone_adapter_load_seconds",
    "registry → usable adapter (read on a loader thread + install between decode steps)",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
)
ADAPTERS_RESIDENT = Gauge("bone_adapters_resident", "adapters resident on the device")
ADAPTERS_RESIDENT_BYTES = Gauge("bone_adapters_resident_bytes", "bytes of adapters resident on the device")


def step_rows_label(rows: int) -> str:
    """The ``rows`` label of ``bone_engine_step_seconds``: ``rows`` rounded down to a power of two, 64 and up as one."""
    return STEP_ROWS_LABELS[min(max(rows, 1).bit_length() - 1, len(STEP_ROWS_LABELS) - 1)]


def observe_step(rows: int, seconds: float) -> None:
    ENGINE_STEP_SECONDS.labels(step_rows_label(rows)).observe(seconds)


class RedisCollector:
    """Scrape-time figures that live in Redis: queue depth, jobs by status, the workers' training metrics."""

    def __init__(self, redis_conn_getter: Callable, queue_name_getter: Callable[[], str]) -> None:
        self._conn = redis_conn_getter
        self._queue_name = queue_name_getter

    def collect(self):
        conn = self._conn()
        if conn is None:
            return
        try:
            depth = conn.llen(f"rq:queue:{self._queue_name()}")
            counts = conn.hgetall(STATUS_COUNTS)
            training = conn.hgetall(TRAINING_METRICS_KEY)
            cotrain = conn.hgetall(COTRAIN_METRICS)
        except Exception:  # Redis down: /readyz says so; a scrape must still answer
            return
        yield GaugeMetricFamily("bone_queue_depth", "jobs waiting in the training queue", value=depth)
        jobs = GaugeMetricFamily("bone_jobs", "jobs by status", labels=["status"])
        for status, count in sorted(counts.items()):
            jobs.add_metric([status.decode()], int(count))
        yield jobs
        for field, help_text in (
            ("tokens_per_s", "training tokens/s (latest step, any worker)"),
            ("step_time_s", "training step time in seconds (latest step)"),
            ("steps_total", "training optimizer steps since the deployment started"),
        ):
            if field.encode() in training:
                yield GaugeMetricFamily(f"bone_training_{field}", help_text, value=float(training[field.encode()]))
        # Co-training (worker/cotrain_claims.py): totals only, no per-job labels (job ids are unbounded);
        # rows per job per micro-batch = bone_cotrain_rows_total / bone_cotrain_member_steps_total.
        for field, help_text in (
            ("groups", "co-training groups formed (a job RQ handed a worker plus queued jobs trained with it)"),
            ("rows", "rows of co-trained micro-batches, all jobs together"),
            ("member_steps", "micro-batches x jobs in them (rows_total / this = rows per job per micro-batch)"),
            ("micro_batches", "co-trained micro-batches"),
            (
                "left_out_slowdown",
                "compatible queued jobs a group left out because the group's step, timed on the worker's device, "
                "would have slowed a member past BONE_COTRAIN_MAX_SLOWDOWN (they stay queued)",
            ),
        ):
            if f"{field}_total".encode() in cotrain:
                yield CounterMetricFamily(
                    f"bone_cotrain_{field}", help_text, value=float(cotrain[f"{field}_total".encode()])
                )
        if b"members" in cotrain:
            yield GaugeMetricFamily(
                "bone_cotrain_members",
                "jobs in the latest co-training group (any worker)",
                value=float(cotrain[b"members"]),
            )


_collector: RedisCollector | None = None


def install_redis_collector(redis_conn_getter: Callable, queue_name_getter: Callable[[], str]) -> None:
    """Register (once per process) the scrape-time collector; later apps in the process re-point it."""
    global _collector
    if _collector is None:
        _collector = RedisCollector(redis_conn_getter, queue_name_getter)
        REGISTRY.register(_collector)
    else:
        _collector._conn, _collector._queue_name = redis_conn_getter, queue_name_getter


def metrics_response() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


class HttpMetricsMiddleware:
    """Request latency by route template, method and status. Plain ASGI (not BaseHTTPMiddleware, which
    costs about half a millisecond per request): it only watches ``http.response.start`` go by."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def watch(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")  # set by the router on this same scope dict
            template = getattr(route, "path", "unmatched")  # the template, never the raw path: bounded labels
            HTTP_LATENCY.labels(template, scope["method"], str(status[0])).observe(time.perf_counter() - started)
