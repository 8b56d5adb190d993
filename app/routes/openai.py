"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

``model`` is an adapter name, or the base model's name for the base model itself. An extra body field
``adapters`` (``{"a": 0.7, "b": 0.3}``; the official client sends it with ``extra_body={"adapters": ...}``)
serves the exact weighted sum of Bone adapters instead; ``model`` is then the base model's name (or any
name that is not a published adapter: naming an adapter and a mix at once is refused, 400 on ``adapters``).
The official ``openai`` client works unchanged (``base_url=http://host:port/v1``); streams follow OpenAI's
chunk format and end with ``data: [DONE]``. Requests go through the same engine as ``/generate`` (batched
with everything else).
``prompt`` may also be token ids (a list of ints, or a list of such lists), as lm-evaluation-harness sends.
``logprobs`` / ``echo`` (completions) and ``logprobs`` / ``top_logprobs`` (chat) report the model's own
log-probabilities (before temperature and top_p, as vLLM does); ``echo`` with ``max_tokens: 0`` scores a
prompt without generating (lm-eval's loglikelihood). ``usage.prompt_tokens`` counts each prompt once, whatever ``n``.

Errors follow OpenAI's table (400 for every invalid request, ``invalid_request_error`` for a missing model:
see ``app.errors``). Fields OpenAI defines but this server cannot honour (``response_format`` other than text,
``logit_bias``, ``suffix``, tools and functions, penalties, ``best_of``) are refused with 400 naming the field
rather than silently ignored; unknown fields are ignored, as OpenAI's SDKs add new ones over time.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse

from app.auth import caller_key
from app.deps import EngineDep, RegistryDep, SettingsDep
from app.engine import BASE_MODEL, GenerationRequest, GenerationResult, InferenceEngine, Target
from app.engine.batch import SamplingParams, TokenLogprob
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
from core.errors import InvalidRequest, NotFound, ServiceError
from core.names import AdapterName
from core.requests import SEED_BOUND, RequestModel
from core.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])

# For tokenizers without a chat template (the embedded model has its own, in the same spirit).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


MAX_MESSAGES = MAX_PROMPTS = 1024  # every prompt, and a rendered conversation, is then bounded by check_prompt
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class _Common(RequestModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=1024)
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo (score the prompt, generate nothing)")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1, description="0 keeps only the most likely token (greedy)")
    # Not OpenAI's; vLLM's extra field (the SDKs pass it with extra_body). None, -1 or 0: off.
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description="sample among the k most likely tokens")
    n: int = Field(1, ge=1, le=8)
    seed: int | None = SeedField
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    adapters: dict[AdapterName, float] | None = AdaptersField
    # Defined by OpenAI, not honoured here: accepted only at their neutral value (see ``_refuse_unsupported``).
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("adapters")
    @classmethod
    def _mix(cls, value: dict[AdapterName, float] | None) -> dict[AdapterName, float] | None:
        return check_mix(value)


MAX_LOGPROBS = 20  # alternatives per position (vLLM's default bound; OpenAI's completions allow 5)

TokenIds = list[int]


class CompletionRequest(_Common):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    )
    echo: bool = False
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="report each token's log-probability and its k most likely alternatives",
    )
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(RequestModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(max_length=64)
    content: PromptText | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# --- responses (OpenAI's shapes; fields in the order the routes build them) -------------------------------------
OpenAIRequest = CompletionRequest | ChatRequest


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


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first prompt token (nothing predicts it)")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt i's choice k is index i * n + k")
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage
    choices: list[ChatChoice]


def _refuse_unsupported(body: OpenAIRequest) -> None:
    """A field OpenAI defines but this server cannot honour is refused (400 naming it), never ignored: a
    client asking for JSON output or a tool call must not get plain text that it then fails to parse."""
    response_format = (body.response_format or {}).get("type", "text")
    refused = {
        "response_format": response_format != "text",
        "logit_bias": bool(body.logit_bias),
        "suffix": bool(getattr(body, "suffix", None)),
        "tools": bool(body.tools),
        "tool_choice": body.tool_choice not in (None, "none"),
        "functions": bool(body.functions),
        "function_call": body.function_call not in (None, "none"),
        "presence_penalty": body.presence_penalty != 0,
        "frequency_penalty": body.frequency_penalty != 0,
        "best_of": getattr(body, "best_of", None) not in (None, 1, body.n),
    }
    for field, used in refused.items():
        if used:
            what = f"response_format type {response_format!r}" if field == "response_format" else field
            raise InvalidRequest(
                f"{what} is not supported by this server (it serves plain text generation only)",
                param=field,
                code="unsupported_parameter",
            )
    if body.stream and _wants_logprobs(body):
        raise InvalidRequest(
            "logprobs are not available when streaming; ask without stream",
            param="logprobs",
            code="unsupported_parameter",
        )


def _wants_logprobs(body: OpenAIRequest) -> bool:
    return body.logprobs is not None and body.logprobs is not False  # completions' logprobs=0 asks too


def _params(body: OpenAIRequest, settings: Settings, default_max: int) -> SamplingParams:
    _refuse_unsupported(body)
    limit = body.max_completion_tokens or body.max_tokens
    if limit is None:
        limit = min(default_max, settings.max_new_tokens)
    if limit > settings.max_new_tokens:
        raise InvalidRequest(
            f"max_tokens={limit} exceeds the server's limit of {settings.max_new_tokens} (BONE_MAX_NEW_TOKENS)",
            param="max_tokens",
        )
    if limit == 0 and not getattr(body, "echo", False):
        raise InvalidRequest(
            "max_tokens=0 generates nothing: it is only useful with echo (to score the prompt)", param="max_tokens"
        )
    if limit == 0 and body.stream:
        raise InvalidRequest("max_tokens=0 scores the prompt; ask without stream", param="stream")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise InvalidRequest("stop takes up to 4 non-empty strings", param="stop")
    top = _top_logprobs(body)
    echo = getattr(body, "echo", False)
    # max_tokens=0: one token is generated (the prefill makes it anyway) and dropped from the answer.
    return SamplingParams(
        max_new_tokens=max(limit, 1),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=-1 if body.top_k is None else body.top_k,
        seed=body.seed,
        stop=tuple(stops),
        logprobs=top,
        prompt_logprobs=top if echo else None,
    )


def _top_logprobs(body: OpenAIRequest) -> int | None:
    """How many alternatives per position the request asked for; None = no logprobs."""
    if isinstance(body, ChatRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def _target(
    model: str, registry: Adapters, settings: Settings, adapters: dict[AdapterName, float] | None = None
) -> Target:
    """What ``model`` (and the ``adapters`` extra field) runs on."""
    if adapters is not None:
        if model != settings.base_model and _is_adapter(model, registry):
            raise InvalidRequest(
                f"model {model!r} is an adapter and adapters is given: a request uses one or the "
                f"other (set model to the base model, {settings.base_model!r})",
                param="adapters",
            )
        return resolve_mix(adapters, registry, settings)
    if model == settings.base_model:
        return BASE_MODEL
    try:
        return resolve_adapter(model, registry, settings)
    except ServiceError as exc:
        exc.param = "model"
        if isinstance(exc, NotFound):
            exc.message = f"the model {model!r} does not exist (GET /v1/models lists them)"
            exc.code = "model_not_found"
        raise


def _is_adapter(model: str, registry: Adapters) -> bool:
    try:
        return registry.exists(model)
    except NotFound:  # not even a valid adapter name
        return False


def _seeded(params: SamplingParams, k: int) -> SamplingParams:
    """Choice k of n: a different (still reproducible) seed, so the n choices are not all alike."""
    if k == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + k) % SEED_BOUND)


def _usage(results: list[GenerationResult], prompt_tokens: int) -> dict:
    """``prompt_tokens``: every prompt once, however many choices (``n``) each has, as OpenAI and vLLM count."""
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _base_card(settings: Settings) -> dict:
    return {
        "id": settings.base_model,
        "object": "model",
        "created": 0,
        "owned_by": "bone-server",
        "parent": None,
        "root": settings.base_model,
    }


def _adapter_card(info, settings: Settings) -> dict:
    return {
        "id": info.name,
        "object": "model",
        "created": int(info.created_at),
        "owned_by": info.owner or "bone-server",
        "parent": settings.base_model,
        "root": settings.base_model,
    }


@router.get("/models", response_model=ModelList)
async def list_models(registry: RegistryDep, settings: SettingsDep) -> dict:
    infos = await run_in_threadpool(registry.list)
    adapters = [
        _adapter_card(info, settings) for info in infos if info.base_model == settings.base_model
    ]  # the ones this server can serve
    return {"object": "list", "data": [_base_card(settings), *adapters]}


@router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, registry: RegistryDep, settings: SettingsDep) -> dict:
    """One model as ``GET /v1/models`` lists it (``client.models.retrieve``); a hub base model's id may hold a slash."""
    if model == settings.base_model:
        return _base_card(settings)
    missing = NotFound(
        f"the model {model!r} does not exist (GET /v1/models lists them)", param="model", code="model_not_found"
    )
    try:
        info = await run_in_threadpool(registry.get, model)
    except (NotFound, InvalidRequest):  # absent, or not even a valid adapter name
        raise missing from None
    if info.base_model != settings.base_model:  # listed nowhere here: this server cannot serve it
        raise missing
    return _adapter_card(info, settings)


@router.post("/completions", response_model=Completion, responses=SSE_RESPONSE)
async def completions(
    body: CompletionRequest, http_request: Request, engine: EngineDep, registry: RegistryDep, settings: SettingsDep
) -> Any:
    params = _params(body, settings, default_max=16)  # OpenAI's default for completions
    target = await run_in_threadpool(_target, body.model, registry, settings, body.adapters)
    ids = await run_in_threadpool(_prompt_ids, engine, body.prompt, settings)  # tokenizing: off the event loop
    key = caller_key(http_request)
    jobs = [GenerationRequest(target, ids[i], _seeded(params, k)) for i in range(len(ids)) for k in range(body.n)]
    prompt_tokens = sum(len(x) for x in ids)
    scoring_only = (body.max_completion_tokens or body.max_tokens) == 0
    texts: list[str] = []  # filled only with echo, the only case that reads it
    if body.echo:  # text prompts come back as given; token ids as they decode (off the event loop)
        texts = await run_in_threadpool(_echoed_texts, engine, body.prompt, ids)
    meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream:

        def chunk(i: int, text: str, finish: str | None) -> dict:
            return {
                **meta,
                "object": "text_completion",
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        first = None
        if body.echo:  # the prompt comes back first, as with OpenAI
            first = [chunk(i * body.n + k, texts[i], None) for i in range(len(ids)) for k in range(body.n)]
        return _sse(
            engine, jobs, body, prompt_tokens, meta, "text_completion", chunk, first=first, role_first=False, key=key
        )
    results = await results_or_disconnect(engine, submit_all(engine, jobs, key=key), http_request)
    if scoring_only:
        results = [_without_completion(r) for r in results]
    choices = []
    for j, result in enumerate(results):
        prompt_text = texts[j // body.n] if body.echo else ""
        logprobs = None
        if body.logprobs is not None:  # naming tokens is detokenizing: off the event loop
            logprobs = await run_in_threadpool(
                _completion_logprobs, engine, ids[j // body.n] if body.echo else None, result
            )
        choices.append(
            {"index": j, "text": prompt_text + result.text, "logprobs": logprobs, "finish_reason": _finish(result)}
        )
    return {**meta, "object": "text_completion", "usage": _usage(results, prompt_tokens), "choices": choices}


def _echoed_texts(engine: InferenceEngine, prompt: str | list, ids: list[list[int]]) -> list[str]:
    return [p if isinstance(p, str) else engine.detokenize(x) for p, x in zip(_prompt_list(prompt), ids)]


def _prompt_ids(engine: InferenceEngine, prompt: str | list, settings: Settings) -> list[list[int]]:
    """One token-id list per prompt: text is bounded (``check_prompt``) and tokenized, token ids (a list, or a
    list of lists) are checked. CPU work: callers run it on a worker thread."""
    prompts = _prompt_list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InvalidRequest("prompt must be a non-empty string, token-id list, or list of either", param="prompt")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_prompt(p, settings, "prompt" if prompts[0] is prompt else f"prompt.{i}")
            ids.append(engine.tokenize(p))
            continue
        bad = next((t for t in p if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            where = "prompt" if prompts[0] is prompt else f"prompt.{i}"
            raise InvalidRequest(
                f"token id {bad} is outside the model's vocabulary (0..{engine.vocab_size - 1})", param=where
            )
        ids.append(list(p))  # as given: no special tokens added (lm-eval scores exactly these)
    return ids


def _prompt_list(prompt: str | list) -> list:
    """The prompts of a request: a string and a token-id list are one prompt each."""
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return [prompt]
    return list(prompt)


def _without_completion(result: GenerationResult) -> GenerationResult:
    """``max_tokens: 0``: the token the prefill generated is not part of the answer."""
    return dataclasses.replace(
        result,
        text="",
        finish_reason="length",
        completion_tokens=0,
        token_ids=[],
        token_logprobs=[] if result.token_logprobs is not None else None,
    )


# --- logprobs in OpenAI's two shapes -----------------------------------------------------------------------
def _completion_logprobs(engine: InferenceEngine, echoed: list[int] | None, result: GenerationResult) -> dict:
    """OpenAI's completions ``logprobs``: the echoed prompt's tokens (if echo), then the generated ones."""
    entries: list[TokenLogprob | None] = list(result.prompt_logprobs or []) if echoed is not None else []
    ids = list(echoed or []) + result.token_ids
    entries += result.token_logprobs or []
    tokens = engine.token_texts(ids)
    alternatives = sorted({t for e in entries if e for t, _ in e[2]})
    names = dict(zip(alternatives, engine.token_texts(alternatives)))
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e[1] for e in entries],
        "top_logprobs": [None if e is None else _top_dict(e, names) for e in entries],
        "text_offset": offsets,
    }


def _top_dict(entry: TokenLogprob, names: dict[int, str]) -> dict[str, float]:
    top: dict[str, float] = {}
    for token, logprob in entry[2]:
        top.setdefault(names[token], logprob)  # two ids that read alike: keep the likelier
    return top


def _chat_logprobs(engine: InferenceEngine, result: GenerationResult) -> dict:
    entries = result.token_logprobs or []
    every = sorted({e[0] for e in entries} | {t for e in entries for t, _ in e[2]})
    names = dict(zip(every, engine.token_texts(every)))

    def item(token: int, logprob: float) -> dict:
        return {"token": names[token], "logprob": logprob, "bytes": list(names[token].encode("utf-8"))}

    return {
        "content": [
            {**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]} for token, logprob, top in entries
        ],
        "refusal": None,
    }


@router.post("/chat/completions", response_model=ChatCompletion, responses=SSE_RESPONSE)
async def chat_completions(
    body: ChatRequest, http_request: Request, engine: EngineDep, registry: RegistryDep, settings: SettingsDep
) -> Any:
    params = _params(body, settings, default_max=settings.max_new_tokens)
    target = await run_in_threadpool(_target, body.model, registry, settings, body.adapters)
    ids = await run_in_threadpool(_chat_ids, engine, body.messages, settings)
    key = caller_key(http_request)
    jobs = [GenerationRequest(target, ids, _seeded(params, k)) for k in range(body.n)]
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": body.model}
    if body.stream:

        def chunk(i: int, text: str | None, finish: str | None) -> dict:
            delta = {} if text is None else {"content": text}
            return {
                **meta,
                "object": "chat.completion.chunk",
                "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        first = [
            {
                **meta,
                "object": "chat.completion.chunk",  # OpenAI opens each choice with the role
                "choices": [
                    {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
            }
            for k in range(body.n)
        ]
        return _sse(engine, jobs, body, len(ids), meta, "chat.completion.chunk", chunk, first=first, key=key)
    results = await results_or_disconnect(engine, submit_all(engine, jobs, key=key), http_request)
    logprobs: list[dict[str, Any] | None] = [None] * len(results)
    if body.logprobs:  # naming tokens is detokenizing: off the event loop
        logprobs = await run_in_threadpool(lambda: [_chat_logprobs(engine, r) for r in results])
    return {
        **meta,
        "object": "chat.completion",
        "usage": _usage(results, len(ids)),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs[i],
                "finish_reason": _finish(r),
            }
            for i, r in enumerate(results)
        ],
    }


def _chat_ids(engine: InferenceEngine, messages: list[ChatMessage], settings: Settings) -> list[int]:
    """Render, bound and tokenize a conversation: CPU work that runs on a worker thread, never the event loop."""
    text = _render_chat(engine, messages)
    check_prompt(text, settings, "messages")
    return engine.tokenize(text, add_special_tokens=False)  # the template has them


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
        text = tokenizer.apply_chat_template(plain, chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation (e.g. roles out of order)
        raise InvalidRequest(f"the chat template rejected these messages: {exc}", param="messages") from None
    assert isinstance(text, str)  # tokenize=False: the rendered text, not ids
    return text


def _sse(
    engine: InferenceEngine,
    jobs: list[GenerationRequest],
    body: OpenAIRequest,
    prompt_tokens: int,
    meta: dict,
    object_: str,
    chunk,
    first,
    role_first: bool = True,
    key: str | None = None,
) -> EventSourceResponse:
    """``first``: events sent before any text (chat: each choice's role; completions with echo: the prompt).
    ``role_first``: the chat stream's shape (a choice's last chunk has an empty delta)."""
    follow = stream_jobs(engine, jobs, key)  # submitted now: a refused request still gets a plain error response
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
                    yield {"data": json.dumps(chunk(i, None if role_first and first else "", _finish(outcome)))}
        finally:
            await follow.aclose()  # abandons what is still running (frees the batch slots)
        if include_usage:
            yield {
                "data": json.dumps({**meta, "object": object_, "choices": [], "usage": _usage(results, prompt_tokens)})
            }
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())
