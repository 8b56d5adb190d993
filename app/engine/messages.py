"""What passes between the request handlers, the adapter loader and the engine's model thread: the
``GenerationRequest`` a handler submits, the items of the engine's inbox (a request, an adapter the loader has
read, work to do between steps, the stop marker) and the ``GenerationResult`` a request's future resolves to."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.engine.adapter_pool import FetchedAdapter, Mix
from app.engine.batch import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class Target:
    """What a generation runs on: the base model (nothing set), one version of a published adapter
    (``adapter`` and its ``sha256``), or a mix of adapters (``mix`` alone)."""

    adapter: str | None = None
    sha256: str | None = None
    mix: Mix | None = None

    def __post_init__(self) -> None:
        if self.mix is not None and self.adapter is not None:
            raise ValueError("a generation runs on one adapter or on a mix, not both")


BASE_MODEL = Target()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, as a route builds it once its request is checked: what it runs on, the prompt's token
    ids and how to sample."""

    target: Target
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class GenerationResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None
    adapters: dict[str, float] | None = None  # the mix served, if the request named one
    token_ids: list[int] = field(default_factory=list)  # what was generated (stop strings may cut the text)
    token_logprobs: list[TokenLogprob] | None = None  # per generated token, when the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, when the request asked


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: str | None
    sha256: str | None
    params: SamplingParams
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    on_text: Callable[[str], None] | None = None
    abandoned: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    fetched: FetchedAdapter | None = None  # its adapter, read by the loader, waiting to be installed
    counted: bool = False  # cache hit/miss recorded
    mix: Mix | None = None  # a mix of adapters: ``adapter`` / ``sha256`` are then the mix's cache key
    key: str | None = None  # who asked (API key, else client address): its share of the queue; None = unbounded
    deferred: bool = False  # held back by its key's share of the batch (counted once)


@dataclass
class Control:
    """Work for the model thread between steps (e.g. evicting a deleted adapter)."""

    action: Callable[[], Any]


@dataclass
class Loaded:
    name: str
    fetched: FetchedAdapter | None
    error: BaseException | None


STOP = object()
