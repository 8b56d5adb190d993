"""``POST /generate``: text from the base model or any published adapter, batched with whatever else is
being generated at the moment (see ``app.engine``). ``stream: true`` answers as server-sent events.
``"adapters": {"a": 0.7, "b": 0.3}`` in place of ``adapter`` serves the exact weighted sum of Bone adapters
(same base model, same r), built and cached by the engine, never written to the registry.

The helpers below (submit, follow a stream, notice a client that hangs up) are shared with the
OpenAI-compatible routes."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse

from app.adapter_cache import Mix
from app.auth import caller_key
from app.decoding import SamplingParams
from app.deps import EngineDep, RegistryDep, SettingsDep
from app.engine import GenerationResult, InferenceEngine
from app.errors import service_error_from
from bone import BoneConfig, BoneConfigError
from bone.arithmetic import check_combinable
from core.errors import Conflict, InvalidRequest, NotFound, ServiceError
from core.names import AdapterName
from core.registry import AdapterRegistry
from core.requests import SEED_BOUND, RequestModel
from core.settings import Settings

router = APIRouter(tags=["generate"])

MAX_MIX = 16  # sources in one per-request mix (as for POST /adapters/{name}/compose)
MAX_MIX_WEIGHT = 100.0  # |w| per source: far beyond any useful blend, and a sum of float32 blocks stays finite
MAX_STOPS, MAX_STOP_CHARS = 4, 512
# A prompt's own bound is the server's (Settings.max_prompt_bytes, checked before tokenizing); this one only
# lifts the default string bound of request models, the body bound keeps it far lower.
MAX_PROMPT_CHARS = 64 << 20
SeedField = Field(None, ge=0, lt=SEED_BOUND, description="0 <= seed < 2**63; same seed, same text")
AdaptersField = Field(
    None,
    min_length=1,
    max_length=MAX_MIX,
    description='a mix of Bone adapters served as their exact weighted sum, e.g. {"a": 0.7, "b": 0.3}; '
    "replaces adapter (nothing is written to the registry)",
)


def check_mix(value: dict[AdapterName, float] | None) -> dict[AdapterName, float] | None:
    """The weights of a mix (its names are checked by their type, ``AdapterName``)."""
    for name, weight in (value or {}).items():
        if not math.isfinite(weight) or abs(weight) > MAX_MIX_WEIGHT:
            raise ValueError(f"the weight of {name!r} must be a finite number with |w| <= {MAX_MIX_WEIGHT:g}")
    return value


def check_prompt(text: str, settings: Settings, param: str = "prompt") -> None:
    """A prompt's size and encoding, checked before it is tokenized: at most ``max_prompt_bytes`` of UTF-8
    (BONE_MAX_PROMPT_TOKENS x BONE_PROMPT_BYTES_PER_TOKEN) and valid Unicode (no lone surrogates, which
    JSON can spell and no tokenizer can encode). Cheap: the length in characters is checked first."""
    limit = settings.max_prompt_bytes
    too_long = InvalidRequest(
        f"{param} is longer than {limit} bytes of UTF-8, more than BONE_MAX_PROMPT_TOKENS="
        f"{settings.max_prompt_tokens} tokens can hold ({settings.prompt_bytes_per_token} bytes a "
        "token, BONE_PROMPT_BYTES_PER_TOKEN)",
        param=param,
        code="prompt_too_long",
    )
    if len(text) > limit:
        raise too_long
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{param} is not valid Unicode: a lone surrogate at character {exc.start}",
                             param=param) from None
    if size > limit:
        raise too_long


DEFAULT_MAX_NEW_TOKENS = 64


class GenerateRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    # A name that cannot exist is an adapter that is not there (404 from the registry), as for every lookup.
    adapter: str | None = Field(None, max_length=AdapterName.MAX_LENGTH,
                                description="adapter name; null = the base model")
    adapters: dict[AdapterName, float] | None = AdaptersField
    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="at most BONE_MAX_PROMPT_TOKENS tokens and that many x BONE_PROMPT_BYTES_PER_TOKEN bytes",
    )
    max_new_tokens: int | None = Field(None, ge=1, description=f"default {DEFAULT_MAX_NEW_TOKENS} (or the server's "
                                       "limit, if lower); bounded by BONE_MAX_NEW_TOKENS")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = SeedField
    stop: Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)] | \
        Annotated[str, Field(max_length=MAX_STOP_CHARS)] | None = None
    stream: bool = False

    @field_validator("adapters")
    @classmethod
    def _mix(cls, value: dict[AdapterName, float] | None) -> dict[AdapterName, float] | None:
        return check_mix(value)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: list[str] | str | None) -> list[str] | str | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    object: str = "generation"
    text: str
    adapter: str | None
    adapters: dict[str, float] | None = None
    finish_reason: str
    usage: Usage


def sampling_params(body: GenerateRequest, settings: Settings) -> SamplingParams:
    # A request that names no budget must not be refused by a server configured below the default.
    limit = body.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens)
    if limit > settings.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens={limit} exceeds the server's limit of "
                             f"{settings.max_new_tokens} (BONE_MAX_NEW_TOKENS)", param="max_new_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_new_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                          seed=body.seed, stop=tuple(stops))


def resolve_adapter(name: str | None, registry: AdapterRegistry, settings: Settings) -> str | None:
    """The sha256 of the adapter version to serve (read from the registry for every request, so a deleted
    or re-published adapter is never served stale); None for the base model."""
    if name is None:
        return None
    try:
        info = registry.get(name)
    except NotFound as exc:
        raise NotFound(exc.message, param="adapter") from None
    if info.base_model != settings.base_model:
        raise Conflict(f"adapter {name!r} was trained on base model {info.base_model!r}, but this server serves "
                       f"{settings.base_model!r}", param="adapter", code="base_model_mismatch")
    return info.sha256


def resolve_mix(adapters: dict[str, float], registry: AdapterRegistry, settings: Settings) -> Mix:
    """Check a mix before it is queued: every source exists (404), was trained on the served base model
    (409) and can be summed exactly with the others (Bone, one r; else 422) — all naming ``adapters``.
    Returns the sorted (name, sha256, weight) tuples the engine keys the mix by."""
    items, mix = [], []
    for name, weight in sorted(adapters.items()):
        try:
            info = registry.get(name)
            config = BoneConfig.from_dict(registry.adapter_config(name))
        except NotFound as exc:
            raise NotFound(exc.message, param=f"adapters.{name}") from None
        if info.base_model != settings.base_model:
            raise Conflict(f"adapter {name!r} was trained on base model {info.base_model!r}, but this server serves "
                           f"{settings.base_model!r}", param=f"adapters.{name}", code="base_model_mismatch")
        items.append((name, config))
        mix.append((name, info.sha256, float(weight)))
    try:
        check_combinable(items)
    except BoneConfigError as exc:
        raise InvalidRequest(str(exc), param="adapters", code="invalid_adapter_mix") from None
    return tuple(mix)


def to_response(result: GenerationResult) -> GenerateResponse:
    usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                  total_tokens=result.prompt_tokens + result.completion_tokens)
    return GenerateResponse(text=result.text, adapter=result.adapter, adapters=result.adapters,
                            finish_reason=result.finish_reason, usage=usage)


class ClientDisconnected(ServiceError):
    """The client went away before its answer (nginx's 499; only the access log ever sees it)."""

    status, type, code = 499, "client_closed_request", "client_disconnected"


async def _disconnected(http_request: Request) -> None:
    """Returns when the client hangs up. The body has been read, so all that can arrive is the disconnect."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def results_or_disconnect(
    engine: InferenceEngine, requests: list, http_request: Request
) -> list[GenerationResult]:
    """Await every request's result; a client that hangs up first frees its batch slots at the next step."""
    outcome = asyncio.ensure_future(asyncio.gather(*(engine.result(r) for r in requests)))
    watcher = asyncio.ensure_future(_disconnected(http_request))
    try:
        await asyncio.wait({outcome, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not outcome.done():
            raise ClientDisconnected("the client closed the connection")
        return outcome.result()
    finally:
        watcher.cancel()
        if not outcome.done():
            outcome.cancel()
        for request in requests:
            request.abandoned.set()


def submit_all(engine: InferenceEngine, jobs: list[tuple], on_text=None, key: str | None = None) -> list:
    """Submit (prompt_ids, adapter, sha256, params[, mix]) jobs for caller ``key``; ``on_text(i, piece)``
    streams job i. All or none: if one is refused (queue full, bounds), the ones already queued are withdrawn."""
    share = engine.settings.queue_share
    if key is not None and len(jobs) > share:  # would be refused whole every time: say so, not 429
        raise InvalidRequest(f"this request asks for {len(jobs)} generations (prompts x n); one key may queue at most "
                             f"{share} at once (BONE_MAX_QUEUE_PER_KEY)", param="n", code="too_many_generations")
    requests = []
    try:
        for i, (ids, adapter, sha256, params, *mix) in enumerate(jobs):
            callback = None if on_text is None else (lambda piece, i=i: on_text(i, piece))
            mix = mix[0] if mix else None
            if mix is None:
                requests.append(engine.submit(ids, adapter, sha256, params, on_text=callback, key=key))
            else:
                requests.append(engine.submit(ids, None, None, params, on_text=callback, mix=mix, key=key))
    except Exception:
        for request in requests:
            request.future.cancel()
            request.abandoned.set()
        raise
    return requests


def stream_jobs(engine: InferenceEngine, jobs: list[tuple], key: str | None = None):
    """Submit now (so a refused request still gets a plain error response), then follow as an async
    iterator of ``(i, piece, None)`` while text arrives and ``(i, None, result or exception)`` when job i ends.
    Closing the iterator (the client left) abandons every unfinished job, which frees its batch slot."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    requests = submit_all(engine, jobs, lambda i, piece: loop.call_soon_threadsafe(pieces.put_nowait, (i, piece)), key)

    async def follow():
        outcomes = {asyncio.ensure_future(engine.result(r)): i for i, r in enumerate(requests)}
        pending = set(outcomes)
        try:
            while pending:
                getter = asyncio.ensure_future(pieces.get())
                done, pending = await asyncio.wait(pending | {getter}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(getter)
                if getter in done:
                    yield (*getter.result(), None)
                else:
                    getter.cancel()
                while not pieces.empty():  # text is queued before its result: send it first
                    yield (*pieces.get_nowait(), None)
                for finished in done - {getter}:
                    yield outcomes[finished], None, finished.exception() or finished.result()
        finally:
            for outcome in outcomes:
                outcome.cancel()
            for request in requests:
                request.abandoned.set()

    return follow()


def error_body(exc: BaseException) -> dict:
    error = service_error_from(exc)
    if error is not None:
        return error.to_dict()
    return {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": "internal_error"}
    }


# ``stream: true`` answers with server-sent events: documented, so clients (and schema checks) expect both.
SSE_RESPONSE = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


@router.post("/generate", response_model=GenerateResponse, responses=SSE_RESPONSE)
async def generate(body: GenerateRequest, http_request: Request, engine: EngineDep, registry: RegistryDep,
                   settings: SettingsDep) -> Any:
    params = sampling_params(body, settings)
    check_prompt(body.prompt, settings)
    key = caller_key(http_request)
    if body.adapters is not None:
        if body.adapter is not None:
            raise InvalidRequest("give either adapter or adapters, not both", param="adapters")
        mix = await run_in_threadpool(resolve_mix, body.adapters, registry, settings)
        job = (await engine.tokenize_async(body.prompt), None, None, params, mix)
    else:
        sha256 = await run_in_threadpool(resolve_adapter, body.adapter, registry, settings)
        job = (await engine.tokenize_async(body.prompt), body.adapter, sha256, params)
    if body.stream:
        return EventSourceResponse(_events(stream_jobs(engine, [job], key)))
    (result,) = await results_or_disconnect(engine, submit_all(engine, [job], key=key), http_request)
    return to_response(result)


async def _events(follow):
    """Text pieces as ``{"text": ...}`` events, then the full response, then ``[DONE]`` (as OpenAI ends streams)."""
    async for _, piece, outcome in follow:
        if piece is not None:
            yield {"data": json.dumps({"text": piece})}
        elif isinstance(outcome, BaseException):  # the stream is open: report in-band
            yield {"event": "error", "data": json.dumps(error_body(outcome))}
        else:
            yield {"event": "done", "data": to_response(outcome).model_dump_json()}
    yield {"data": "[DONE]"}
