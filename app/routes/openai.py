"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

``model`` is an adapter name, or the base model's name for the base model itself. An extra body field
``adapters`` (``{"a": 0.7, "b": 0.3}``; the official client sends it with ``extra_body={"adapters": ...}``)
serves the exact weighted sum of Bone adapters instead; ``model`` is then the base model's name (or any
name that is not a published adapter: naming an adapter and a mix at once is refused, 422 on ``adapters``). The official ``openai``
client works unchanged (``base_url=http://host:port/v1``); streams follow OpenAI's chunk format and end with
``data: [DONE]``. Requests go through the same engine as ``/generate`` (batched with everything else).
Fields OpenAI defines but this server cannot honour (logprobs, echo, penalties, tools) are refused with
422 naming the field rather than silently ignored; unknown fields are ignored, as OpenAI's SDKs add new
ones over time.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse

from app.decoding import SamplingParams
from app.deps import EngineDep, RegistryDep, SettingsDep
from app.engine import GenerationResult, InferenceEngine
from app.adapter_cache import Mix
from app.routes.generate import (SSE_RESPONSE, AdaptersField, Usage, check_mix, error_body, resolve_adapter,
                                 resolve_mix, results_or_disconnect, stream_jobs, submit_all)
from core.errors import InvalidRequest, NotFound, ServiceError
from core.registry import AdapterRegistry
from core.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])

# For tokenizers without a chat template (the embedded model has its own, in the same spirit).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=8)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    adapters: dict[str, float] | None = AdaptersField

    @field_validator("adapters")
    @classmethod
    def _mix(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return check_mix(value)


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Any] | None = None


# --- responses (OpenAI's shapes; fields in the order the routes build them) -------------------------------------
class ModelCard(BaseModel):
    id: str = Field(description="the base model's name, or an adapter's")
    object: Literal["model"] = "model"
    created: int = Field(description="when the adapter was published (unix time); 0 for the base model")
    owned_by: str = Field(description="the adapter's owner, else bone-server")
    parent: str | None = Field(description="the base model an adapter was trained on; null for the base model")
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(description="the base model first, then every adapter trained on it")


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt i's choice k is index i * n + k")
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    created: int
    model: str
    object: Literal["text_completion"] = "text_completion"
    usage: Usage
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage
    choices: list[ChatChoice]


def _params(body: _Common, settings: Settings, default_max: int) -> SamplingParams:
    refused = {"logprobs": body.logprobs not in (None, False, 0), "presence_penalty": body.presence_penalty != 0,
               "frequency_penalty": body.frequency_penalty != 0, "echo": getattr(body, "echo", False),
               "best_of": getattr(body, "best_of", None) not in (None, 1), "tools": bool(getattr(body, "tools", None))}
    for field, used in refused.items():
        if used:
            raise InvalidRequest(f"{field} is not supported by this server", param=field, code="unsupported_parameter")
    limit = body.max_completion_tokens or body.max_tokens or min(default_max, settings.max_new_tokens)
    if limit > settings.max_new_tokens:
        raise InvalidRequest(f"max_tokens={limit} exceeds the server's limit of {settings.max_new_tokens} "
                             "(BONE_MAX_NEW_TOKENS)", param="max_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise InvalidRequest("stop takes up to 4 non-empty strings", param="stop")
    return SamplingParams(max_new_tokens=limit, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                          stop=tuple(stops))


def _adapter_for(model: str, registry: AdapterRegistry, settings: Settings,
                 adapters: dict[str, float] | None = None) -> tuple[str | None, str | None, Mix | None]:
    """(adapter name, sha256, mix) for ``model`` (and the ``adapters`` extra field); (None, None, None) is
    the base model."""
    if adapters is not None:
        if model != settings.base_model and _is_adapter(model, registry):
            raise InvalidRequest(f"model {model!r} is an adapter and adapters is given: a request uses one or the "
                                 f"other (set model to the base model, {settings.base_model!r})", param="adapters")
        return None, None, resolve_mix(adapters, registry, settings)
    if model == settings.base_model:
        return None, None, None
    try:
        return model, resolve_adapter(model, registry, settings), None
    except ServiceError as exc:
        exc.param = "model"
        if isinstance(exc, NotFound):
            exc.message = f"the model {model!r} does not exist (GET /v1/models lists them)"
            exc.code = "model_not_found"
        raise


def _is_adapter(model: str, registry: AdapterRegistry) -> bool:
    try:
        return registry.exists(model)
    except NotFound:  # not even a valid adapter name
        return False


def _seeded(params: SamplingParams, k: int) -> SamplingParams:
    """Choice k of n: a different (still reproducible) seed, so the n choices are not all alike."""
    if k == 0 or params.seed is None:
        return params
    return SamplingParams(params.max_new_tokens, params.temperature, params.top_p, params.seed + k, params.stop)


def _usage(results: list[GenerationResult], prompt_tokens: int) -> dict:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


@router.get("/models", response_model=ModelList)
async def list_models(registry: RegistryDep, settings: SettingsDep) -> dict:
    infos = await run_in_threadpool(registry.list)
    base = {"id": settings.base_model, "object": "model", "created": 0, "owned_by": "bone-server", "parent": None,
            "root": settings.base_model}
    adapters = [{"id": info.name, "object": "model", "created": int(info.created_at), "owned_by": info.owner or "bone-server",
                 "parent": settings.base_model, "root": settings.base_model}
                for info in infos if info.base_model == settings.base_model]  # the ones this server can serve
    return {"object": "list", "data": [base, *adapters]}


@router.post("/completions", response_model=Completion, responses=SSE_RESPONSE)
async def completions(body: CompletionRequest, http_request: Request, engine: EngineDep, registry: RegistryDep,
                      settings: SettingsDep) -> Any:
    params = _params(body, settings, default_max=16)  # OpenAI's default for completions
    adapter, sha256, mix = await run_in_threadpool(_adapter_for, body.model, registry, settings, body.adapters)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts):
        raise InvalidRequest("prompt must be a non-empty string or list of strings", param="prompt")
    ids = [engine.tokenize(p) for p in prompts]
    jobs = [(ids[i], adapter, sha256, _seeded(params, k), mix) for i in range(len(prompts)) for k in range(body.n)]
    prompt_tokens = sum(len(x) for x in ids)
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream:
        def chunk(i: int, text: str, finish: str | None) -> dict:
            return {**meta, "object": "text_completion",
                    "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]}
        return _sse(engine, jobs, body, prompt_tokens, meta, "text_completion", chunk, first=None)
    results = await results_or_disconnect(engine, submit_all(engine, jobs), http_request)
    return {**meta, "object": "text_completion", "usage": _usage(results, prompt_tokens * body.n),
            "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": _finish(r)}
                        for i, r in enumerate(results)]}


@router.post("/chat/completions", response_model=ChatCompletion, responses=SSE_RESPONSE)
async def chat_completions(body: ChatRequest, http_request: Request, engine: EngineDep, registry: RegistryDep,
                           settings: SettingsDep) -> Any:
    params = _params(body, settings, default_max=settings.max_new_tokens)
    adapter, sha256, mix = await run_in_threadpool(_adapter_for, body.model, registry, settings, body.adapters)
    ids = engine.tokenize(_render_chat(engine, body.messages), add_special_tokens=False)  # the template has them
    jobs = [(ids, adapter, sha256, _seeded(params, k), mix) for k in range(body.n)]
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream:
        def chunk(i: int, text: str | None, finish: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            return {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        first = [{**meta, "object": "chat.completion.chunk",  # OpenAI opens each choice with the role
                  "choices": [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]} for k in range(body.n)]
        return _sse(engine, jobs, body, len(ids), meta, "chat.completion.chunk", chunk, first=first)
    results = await results_or_disconnect(engine, submit_all(engine, jobs), http_request)
    return {**meta, "object": "chat.completion", "usage": _usage(results, len(ids) * body.n),
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                         "finish_reason": _finish(r)} for i, r in enumerate(results)]}


def _render_chat(engine: InferenceEngine, messages: list[ChatMessage]) -> str:
    plain = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):  # OpenAI's content parts: text parts only
            if any(part.get("type") != "text" for part in content):
                raise InvalidRequest("only text content parts are supported", param=f"messages.{i}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        plain.append({"role": message.role, "content": content or ""})
    tokenizer = engine.tokenizer
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(plain, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation (e.g. roles out of order)
        raise InvalidRequest(f"the chat template rejected these messages: {exc}", param="messages") from None


def _sse(engine, jobs, body: _Common, prompt_tokens: int, meta: dict, object_: str, chunk, first) -> EventSourceResponse:
    follow = stream_jobs(engine, jobs)  # submitted now: a refused request still gets a plain error response
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events():
        for event in first or ():
            yield {"data": json.dumps(event)}
        results = []
        try:
            async for i, piece, outcome in follow:
                if piece is not None:
                    yield {"data": json.dumps(chunk(i, piece, None))}
                elif isinstance(outcome, BaseException):
                    yield {"data": json.dumps(error_body(outcome))}  # OpenAI's SDK raises on an "error" payload
                    return
                else:
                    results.append(outcome)
                    yield {"data": json.dumps(chunk(i, None if first else "", _finish(outcome)))}
        finally:
            await follow.aclose()  # abandons what is still running (frees the batch slots)
        if include_usage:
            yield {"data": json.dumps({**meta, "object": object_, "choices": [],
                                       "usage": _usage(results, prompt_tokens * body.n)})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())
