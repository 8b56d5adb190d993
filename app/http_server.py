"""The HTTP server's settings: uvicorn with timeouts and limits, so slow or idle clients cannot hold it.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and answers 503 past ``limit_concurrency``,
but it has no deadline for a request's head: a client that opens a connection and sends a header byte a
second (slowloris) holds it for as long as it likes, and enough of them exhaust the connection limit or the
file descriptors. ``with_head_deadline`` adds that deadline to uvicorn's own HTTP protocol: a connection
ready for a request (just opened, or its last response done) that has not delivered the whole head within
``BONE_HTTP_HEADER_TIMEOUT_S`` is closed. Once the head is in, the route's own bounds apply.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn

from core.settings import Settings

log = logging.getLogger(__name__)


def _uvicorn_protocol() -> type:
    """The protocol uvicorn's "auto" would pick: httptools when installed, else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def with_head_deadline(base: type, timeout_s: float, max_head_bytes: int) -> type:
    """``base`` (one of uvicorn's HTTP protocols) that closes a connection whose request head is late, or
    larger than ``max_head_bytes`` (httptools has no such bound of its own; h11 has one).

    Both of uvicorn's protocols start a new ``cycle`` when a head is complete; so "the head arrived" is "the
    cycle changed since the deadline was armed"."""

    class HeadDeadlineProtocol(base):
        _head_timer: asyncio.TimerHandle | None = None
        _cycle_then = None
        _head_bytes = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is None:
                return
            if self.cycle is not self._cycle_then:  # the head is in: the route's own bounds apply now
                self._disarm()
                return
            self._head_bytes += len(data)
            if self._head_bytes > max_head_bytes and not self.transport.is_closing():
                self._disarm()
                log.info("closing a connection from %s: request head over %d bytes", self._peer(), max_head_bytes)
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()  # a keep-alive connection owes the next head as promptly

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            self._disarm()
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a pipelined request is running: armed again when its response completes
            self._cycle_then, self._head_bytes = self.cycle, 0
            self._head_timer = self.loop.call_later(timeout_s, self._head_deadline)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline(self) -> None:
            self._head_timer = None
            if self.cycle is self._cycle_then and not self.transport.is_closing():
                log.info(
                    "closing a connection from %s: no complete request head within %.0f s", self._peer(), timeout_s
                )
                self.transport.close()

        def _peer(self) -> str:
            return self.client[0] if self.client else "?"

    HeadDeadlineProtocol.__name__ = f"HeadDeadline{base.__name__}"
    return HeadDeadlineProtocol


def uvicorn_config(app, settings: Settings, **overrides) -> uvicorn.Config:
    """How ``bone-server api``/``up`` serve ``app`` (tests build their live servers with it too)."""
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn keeps our logging (JSON lines, request ids)
        http=with_head_deadline(_uvicorn_protocol(), settings.http_header_timeout_s, settings.http_max_header_bytes),
        timeout_keep_alive=settings.http_keep_alive_s,
        limit_concurrency=settings.http_max_connections,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)
