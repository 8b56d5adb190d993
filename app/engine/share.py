"""Each key's share of the running batch: rows and reserved KV cache tokens (``Settings.running_share`` and
``kv_share``). Work-conserving: a key alone may fill the batch; once another key waits, a key at or beyond its
share is admitted no new row until it is back under it (its running rows carry on: none is stopped). A key
holding nothing is always admitted (a request larger than the KV share would otherwise never run), and
requests without a key (``None``: internal callers) are one tenant.

``Holdings`` is built for one admission pass (``Scheduler._admit``) and follows it: what each key holds of the
admitted rows and which keys still wait."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from app.engine.messages import Request


def kv_tokens(request: Request) -> int:
    """The KV cache tokens a request may come to hold, reserved when it is admitted: its prompt and every token
    it may generate."""
    return len(request.prompt_ids) + request.params.max_new_tokens


class Holdings:
    def __init__(self, admitted: Iterable[Request], waiting: Iterable[Request], rows: int, kv: int) -> None:
        self.row_share, self.kv_share = rows, kv
        self.rows: Counter[str | None] = Counter()
        self.kv: Counter[str | None] = Counter()
        for request in admitted:
            self.rows[request.key] += 1
            self.kv[request.key] += kv_tokens(request)
        # requests whose caller gave up do not count as waiting (they leave in this pass)
        self.waiting: Counter[str | None] = Counter(
            r.key for r in waiting if not r.future.cancelled() and not r.abandoned.is_set()
        )

    def deferred(self, request: Request) -> bool:
        """Whether ``request`` must wait for its key to fall back under its share: the key would go beyond it
        while another key under its own share waits. (If every waiting key is beyond its share, none is held
        back: rows are not left idle.)"""
        key = request.key
        beyond = self.rows[key] + 1 > self.row_share or (
            self.kv[key] > 0 and self.kv[key] + kv_tokens(request) > self.kv_share
        )
        return beyond and any(k != key and count > 0 and self._under(k) for k, count in self.waiting.items())

    def admitted(self, request: Request) -> None:
        self.rows[request.key] += 1
        self.kv[request.key] += kv_tokens(request)
        self.left(request)

    def left(self, request: Request) -> None:
        """``request`` no longer waits (admitted, failed, given up)."""
        self.waiting[request.key] -= 1

    def _under(self, key: str | None) -> bool:
        return self.rows[key] < self.row_share and self.kv[key] < self.kv_share
