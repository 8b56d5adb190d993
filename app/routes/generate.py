"""``POST /generate``: text from the base model or any published adapter, batched with whatever else is
being generated at the moment (see ``app.engine``). ``stream: true`` answers as server-sent events."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse

from app.decoding import SamplingParams
from app.deps import EngineDep, RegistryDep, SettingsDep
from app.engine import GenerationResult, InferenceEngine
from app.errors import service_error_from
from core.errors import Conflict, InvalidRequest, NotFound
from core.registry import AdapterRegistry
from core.settings import Settings

router = APIRouter(tags=["generate"])


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: str | None = Field(None, description="adapter name; null = the base model")
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1, description="bounded by BONE_MAX_NEW_TOKENS")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: Annotated[list[str], Field(max_length=4)] | str | None = None
    stream: bool = False

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
    finish_reason: str
    usage: Usage


def sampling_params(body: GenerateRequest, settings: Settings) -> SamplingParams:
    if body.max_new_tokens > settings.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens={body.max_new_tokens} exceeds the server's limit of "
                             f"{settings.max_new_tokens} (BONE_MAX_NEW_TOKENS)", param="max_new_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
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


def to_response(result: GenerationResult) -> GenerateResponse:
    usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                  total_tokens=result.prompt_tokens + result.completion_tokens)
    return GenerateResponse(text=result.text, adapter=result.adapter, finish_reason=result.finish_reason, usage=usage)


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, engine: EngineDep, registry: RegistryDep, settings: SettingsDep) -> Any:
    params = sampling_params(body, settings)
    sha256 = await run_in_threadpool(resolve_adapter, body.adapter, registry, settings)
    prompt_ids = engine.tokenize(body.prompt)
    if body.stream:
        return EventSourceResponse(_stream(engine, prompt_ids, body.adapter, sha256, params))
    return to_response(await engine.generate(prompt_ids, body.adapter, sha256, params))


def _stream(engine: InferenceEngine, prompt_ids: list[int], adapter: str | None, sha256: str | None,
            params: SamplingParams):
    """Text pieces as ``{"text": ...}`` events, then the full response, then ``[DONE]`` (as OpenAI ends streams).
    The request is queued before the stream opens, so a bad request still gets a plain error response."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()
    request = engine.submit(prompt_ids, adapter, sha256, params,
                            on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))

    async def events():
        outcome = asyncio.ensure_future(engine.result(request))
        try:
            while True:
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, outcome}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield {"data": json.dumps({"text": getter.result()})}
                    continue
                getter.cancel()
                while not pieces.empty():
                    yield {"data": json.dumps({"text": pieces.get_nowait()})}
                try:
                    final = to_response(outcome.result())
                    yield {"event": "done", "data": final.model_dump_json()}
                except Exception as exc:  # noqa: BLE001 - the stream is open: report in-band
                    error = service_error_from(exc)
                    body = error.to_dict() if error else {"error": {"message": "internal server error", "type": "server_error",
                                                                     "param": None, "code": "internal_error"}}
                    yield {"event": "error", "data": json.dumps(body)}
                yield {"data": "[DONE]"}
                return
        finally:
            if not outcome.done():
                outcome.cancel()  # the client left: the engine drops the row at its next step

    return events()
