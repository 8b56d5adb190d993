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


def with_head_deadline(base: type, timeout_s: float) -> type:
    """``base`` (one of uvicorn's HTTP protocols) that closes a connection whose request head is late.

    Both of uvicorn's protocols start a new ``cycle`` when a head is complete; so "the head arrived" is "the
    cycle changed since the deadline was armed"."""

    class HeadDeadlineProtocol(base):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()  # a keep-alive connection owes the next head as promptly

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(timeout_s, self._head_deadline, self.cycle)

        def _head_deadline(self, cycle_then) -> None:
            self._head_timer = None
            waiting = self.cycle is cycle_then and (cycle_then is None or cycle_then.response_complete)
            if waiting and not self.transport.is_closing():
                log.info("closing a connection from %s: no complete request head within %.0f s",
                         self.client[0] if self.client else "?", timeout_s)
                self.transport.close()

    HeadDeadlineProtocol.__name__ = f"HeadDeadline{base.__name__}"
    return HeadDeadlineProtocol


def uvicorn_config(app, settings: Settings, **overrides) -> uvicorn.Config:
    """How ``bone-server api``/``up`` serve ``app`` (tests build their live servers with it too)."""
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level,
                   log_config=None,  # uvicorn keeps our logging (JSON lines, request ids)
                   http=with_head_deadline(_uvicorn_protocol(), settings.http_header_timeout_s),
                   timeout_keep_alive=settings.http_keep_alive_s,
                   limit_concurrency=settings.http_max_connections,
                   h11_max_incomplete_event_size=settings.http_max_header_bytes)
    options.update(overrides)
    return uvicorn.Config(app, **options)
