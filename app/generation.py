"""Generation as every generating route does it (``POST /generate`` and the OpenAI-compatible routes): the
request fields and checks they share, resolving what a request runs on (an adapter's current version, or a
mix), submitting its generations to the engine all or none, and following them to the end (awaited, or
streamed) while noticing a client that hangs up."""

from __future__ import annotations

import asyncio
import math
from typing import Any, overload

from fastapi import Request
from pydantic import BaseModel, Field

from app.engine import GenerationRequest, GenerationResult, InferenceEngine, Target
from app.errors import service_error_from
from bone import BoneConfig, BoneConfigError
from bone.arithmetic import check_combinable
from core.access import Adapters
from core.errors import Conflict, InvalidRequest, NotFound, ServiceError
from core.names import AdapterName
from core.registry import AdapterInfo
from core.requests import SEED_BOUND
from core.settings import Settings

MAX_MIX = 16  # sources in one per-request mix (as for POST /adapters/{name}/compose)
MAX_MIX_WEIGHT = 100.0  # |w| per source: far beyond any useful blend, and a sum of float32 blocks stays finite
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


@overload
def check_mix(value: dict[AdapterName, float]) -> dict[AdapterName, float]: ...
@overload
def check_mix(value: None) -> None: ...
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
        raise InvalidRequest(
            f"{param} is not valid Unicode: a lone surrogate at character {exc.start}", param=param
        ) from None
    if size > limit:
        raise too_long


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def _served_info(name: str, registry: Adapters, settings: Settings, param: str) -> AdapterInfo:
    """The registry's record of adapter ``name``, read for every request (so a deleted or re-published adapter is
    never served stale), if this server can serve it: 404 if absent, 409 if trained on another base model."""
    try:
        info = registry.get(name)
    except NotFound as exc:
        raise NotFound(exc.message, param=param) from None
    if info.base_model != settings.base_model:
        raise Conflict(
            f"adapter {name!r} was trained on base model {info.base_model!r}, but this server serves "
            f"{settings.base_model!r}",
            param=param,
            code="base_model_mismatch",
        )
    return info


def resolve_adapter(name: str, registry: Adapters, settings: Settings) -> Target:
    """One published adapter, at the version the registry holds now."""
    return Target(adapter=name, sha256=_served_info(name, registry, settings, "adapter").sha256)


def resolve_mix(adapters: dict[AdapterName, float], registry: Adapters, settings: Settings) -> Target:
    """Check a mix before it is queued: every source exists (404), was trained on the served base model
    (409) and can be summed exactly with the others (Bone, one r; else 422) — all naming ``adapters``.
    Its sorted (name, sha256, weight) tuples are what the engine keys the mix by."""
    items, mix = [], []
    for name, weight in sorted(adapters.items()):
        info = _served_info(name, registry, settings, f"adapters.{name}")
        try:
            config = BoneConfig.from_dict(registry.adapter_config(name))
        except NotFound as exc:
            raise NotFound(exc.message, param=f"adapters.{name}") from None
        items.append((name, config))
        mix.append((name, info.sha256, float(weight)))
    try:
        check_combinable(items)
    except BoneConfigError as exc:
        raise InvalidRequest(str(exc), param="adapters", code="invalid_adapter_mix") from None
    return Target(mix=tuple(mix))


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
        either: set[asyncio.Future[Any]] = {outcome, watcher}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not outcome.done():
            raise ClientDisconnected("the client closed the connection")
        return outcome.result()
    finally:
        watcher.cancel()
        if not outcome.done():
            outcome.cancel()
        for request in requests:
            request.abandoned.set()


def submit_all(engine: InferenceEngine, jobs: list[GenerationRequest], on_text=None, key: str | None = None) -> list:
    """Submit ``jobs`` for caller ``key``; ``on_text(i, piece)`` streams job i. All or none: if one is refused
    (queue full, bounds), the ones already queued are withdrawn."""
    share = engine.settings.queue_share
    if key is not None and len(jobs) > share:  # would be refused whole every time: say so, not 429
        raise InvalidRequest(
            f"this request asks for {len(jobs)} generations (prompts x n); one key may queue at most "
            f"{share} at once (BONE_MAX_QUEUE_PER_KEY)",
            param="n",
            code="too_many_generations",
        )
    requests = []
    try:
        for i, job in enumerate(jobs):
            callback = None if on_text is None else (lambda piece, i=i: on_text(i, piece))
            requests.append(engine.submit(job, on_text=callback, key=key))
    except Exception:
        for request in requests:
            request.future.cancel()
            request.abandoned.set()
        raise
    return requests


def stream_jobs(engine: InferenceEngine, jobs: list[GenerationRequest], key: str | None = None):
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
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}
}
