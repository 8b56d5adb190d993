"""``POST /generate``: text from the base model or any published adapter, batched with whatever else is
being generated at the moment (see ``app.engine`` and ``app.generation``). ``stream: true`` answers as
server-sent events.
``"adapters": {"a": 0.7, "b": 0.3}`` in place of ``adapter`` serves the exact weighted sum of Bone adapters
(same base model, same r), built and cached by the engine, never written to the registry.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse

from app.auth import caller_key
from app.deps import EngineDep, RegistryDep, SettingsDep
from app.engine import BASE_MODEL, GenerationRequest, GenerationResult, InferenceEngine
from app.engine.batch import SamplingParams
from app.engine.sampling import MAX_TOP_K
from app.generation import (
    MAX_PROMPT_CHARS,
    SSE_RESPONSE,
    AdaptersField,
    SeedField,
    Usage,
    check_mix,
    check_prompt,
    error_body,
    resolve_adapter,
    resolve_mix,
    results_or_disconnect,
    stream_jobs,
    submit_all,
)
from core.access import Adapters
from core.errors import InvalidRequest
from core.names import AdapterName
from core.requests import RequestModel
from core.settings import Settings

router = APIRouter(tags=["generate"])

MAX_STOPS, MAX_STOP_CHARS = 4, 512
DEFAULT_MAX_NEW_TOKENS = 64


class GenerateRequest(RequestModel):
    model_config = ConfigDict(extra="forbid")

    # A name that cannot exist is an adapter that is not there (404 from the registry), as for every lookup.
    adapter: str | None = Field(
        None, max_length=AdapterName.MAX_LENGTH, description="adapter name; null = the base model"
    )
    adapters: dict[AdapterName, float] | None = AdaptersField
    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="at most BONE_MAX_PROMPT_TOKENS tokens and that many x BONE_PROMPT_BYTES_PER_TOKEN bytes",
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description=f"default {DEFAULT_MAX_NEW_TOKENS} (or the server's "
        "limit, if lower); bounded by BONE_MAX_NEW_TOKENS",
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=MAX_TOP_K, description="sample among the k most likely tokens; -1 or 0: off")
    seed: int | None = SeedField
    stop: (
        Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)]
        | Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | None
    ) = None
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
        raise InvalidRequest(
            f"max_new_tokens={limit} exceeds the server's limit of {settings.max_new_tokens} (BONE_MAX_NEW_TOKENS)",
            param="max_new_tokens",
        )
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_new_tokens=limit,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(stops),
    )


def to_response(result: GenerationResult) -> GenerateResponse:
    usage = Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )
    return GenerateResponse(
        text=result.text,
        adapter=result.adapter,
        adapters=result.adapters,
        finish_reason=result.finish_reason,
        usage=usage,
    )


@router.post("/generate", response_model=GenerateResponse, responses=SSE_RESPONSE)
async def generate(
    body: GenerateRequest, http_request: Request, engine: EngineDep, registry: RegistryDep, settings: SettingsDep
) -> Any:
    job = await generation_request(body, engine, registry, settings)
    key = caller_key(http_request)
    if body.stream:
        return EventSourceResponse(_events(stream_jobs(engine, [job], key)))
    (result,) = await results_or_disconnect(engine, submit_all(engine, [job], key=key), http_request)
    return to_response(result)


async def generation_request(
    body: GenerateRequest, engine: InferenceEngine, registry: Adapters, settings: Settings
) -> GenerationRequest:
    """The request's one generation, every field checked once: sampling, the prompt's size (before it is
    tokenized), what it runs on (read from the registry now), then the prompt's tokens."""
    params = sampling_params(body, settings)
    check_prompt(body.prompt, settings)
    if body.adapters is not None:
        if body.adapter is not None:
            raise InvalidRequest("give either adapter or adapters, not both", param="adapters")
        target = await run_in_threadpool(resolve_mix, body.adapters, registry, settings)
    elif body.adapter is not None:
        target = await run_in_threadpool(resolve_adapter, body.adapter, registry, settings)
    else:
        target = BASE_MODEL
    return GenerationRequest(target, await engine.tokenize_async(body.prompt), params)


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
