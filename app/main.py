"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan builds the heavy things once.

Run with ``uvicorn --factory app.main:create_app`` (or ``bone-server api``). The lifespan opens Redis (short
socket timeouts, so a dead Redis answers 503 within a second instead of hanging), the RQ queue, the job
store, the adapter registry and the inference engine, which loads the base model once.
"""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager
from functools import partial

import redis
from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue

from app.auth import guard
from app.engine import InferenceEngine
from app.errors import BodySizeLimit, error_responses, install_error_handlers
from app.job_checks import JobChecker
from app.observability import install_observability
from app.openapi import install_openapi
from app.query_params import REFUSAL_NOTE, refuse_unknown_query, warm_known_query_params
from app.routes import adapter_export, adapter_import, adapters, evals, files, fleet, generate, health, jobs, openai
from app.routes.adapter_export import export_adapter
from app.security_headers import SecurityHeaders
from app.vllm_sync import VllmFolderSync
from core.auth import KeyRing
from core.base_model import load_base_model
from core.evals import EvalStore
from core.janitor import Janitor
from core.jobstore import JobStore
from core.registry import AdapterRegistry
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

UPLOAD_PATHS = ("/files", "/adapters")  # multipart routes, bounded by BONE_MAX_UPLOAD_BYTES
# Generation bodies hold one prompt's worth (Settings.max_generation_body_bytes): route -> the field that is large.
GENERATION_PATHS = {"/generate": "prompt", "/v1/completions": "prompt", "/v1/chat/completions": "messages"}
REDIS_CONNECT_TIMEOUT_S = 1.0
REDIS_SOCKET_TIMEOUT_S = 5.0  # above the longest blocking read (job events follow with 1 s XREADs)


def connect_redis(url: str) -> redis.Redis:
    # One quick retry rides over a dropped idle connection; more (redis-py's default backs off for
    # seconds) would only delay the 503 a client gets while Redis is down.
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def _lora_zip(registry, engine, settings, name: str) -> bytes:
    return export_adapter(registry, engine, settings, name, "lora", None)[0]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        conn = connect_redis(settings.redis_url)
        registry = AdapterRegistry.from_settings(settings)
        swept = await run_in_threadpool(registry.sweep, settings.registry_sweep_grace_s)
        if swept:
            log.info("removed %d leftovers of interrupted publishes from %s", swept, registry.root)
        settings.datasets_dir.mkdir(parents=True, exist_ok=True)
        log.info("loading base model %r", settings.base_model)
        base = await run_in_threadpool(load_base_model, settings.base_model, settings, None, settings.dtype)
        log.info(
            "base model %r loaded on %s in %s", settings.base_model, base.device, next(base.model.parameters()).dtype
        )
        engine = InferenceEngine(base, registry, settings)
        engine.start()
        app.state.settings = settings
        app.state.redis = conn
        app.state.queue = Queue(settings.queue_name, connection=conn)
        app.state.jobstore = JobStore(conn)
        app.state.evalstore = EvalStore(conn)
        app.state.registry = registry
        app.state.engine = engine
        app.state.job_checker = JobChecker(settings, registry, server_model_config=base.model.config)
        janitor = Janitor(settings).start()  # re-queues jobs whose worker died, even with no worker left alive
        vllm_sync = None
        if settings.vllm_export_dir is not None:
            vllm_sync = VllmFolderSync(registry, partial(_lora_zip, registry, engine, settings), settings).start()
        # The OpenAPI document (and from it the query parameters each route takes, app/query_params.py) is
        # built now, in a thread: built on first use it held the event loop ~200 ms, stalling every tenant.
        await run_in_threadpool(warm_known_query_params, app)
        # What start-up built (model, tokenizer, imported modules) lives as long as the process: frozen, it is
        # out of the collector's sight, so a full collection never walks it while requests wait.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            janitor.stop()
            if vllm_sync is not None:
                vllm_sync.stop()
            await run_in_threadpool(engine.stop)
            conn.close()

    app = FastAPI(
        title="bone-server",
        version="0.1.0",
        lifespan=lifespan,
        description="Fine-tune Bone adapters on one shared base model and serve them all, batched.",
    )
    app.state.settings = settings
    app.state.keyring = KeyRing.from_settings(settings)  # AuthConfigError: an open API on a public address
    install_error_handlers(app)
    why = (
        "BONE_MAX_BODY_BYTES"
        if settings.max_generation_body_bytes == settings.max_body_bytes
        else "a prompt's worth: BONE_MAX_PROMPT_TOKENS x BONE_PROMPT_BYTES_PER_TOKEN, JSON-escaped"
    )
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        upload_paths=UPLOAD_PATHS,
        max_upload_bytes=settings.max_upload_bytes,
        path_limits={
            path: (settings.max_generation_body_bytes, why, param) for path, param in GENERATION_PATHS.items()
        },
    )
    install_observability(app)
    app.add_middleware(SecurityHeaders)  # outermost: error and 503 answers get the headers too
    install_openapi(app, settings)
    app.include_router(health.router, responses=error_responses(413, 500, 503))
    # Every other router: a key (when keys are configured), the per-key rate limit, the error envelope documented
    # (app.openapi narrows it per route); the native ones also refuse unknown query parameters, after the key
    # check (a caller without a key learns nothing about a route). /v1 tolerates them, as OpenAI's clients add
    # their own (app.query_params).
    for module in (jobs, files, adapters, adapter_import, adapter_export, generate, openai, fleet, evals):
        if module is openai:
            app.include_router(module.router, dependencies=[Depends(guard)], responses=error_responses())
            continue
        app.include_router(
            module.router,
            dependencies=[Depends(guard), Depends(refuse_unknown_query)],
            responses=error_responses(notes={422: REFUSAL_NOTE}),
        )
    return app
