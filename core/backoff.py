"""Exponential backoff for reconnects and restarts: 1 s, 2 s, 4 s ... up to a bound, with a little jitter
so a fleet that lost its Redis together does not come back in step."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, max_s: float, first_s: float = 1.0) -> None:
        self.max_s, self.first_s = max_s, first_s
        self._next = min(first_s, max_s)

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay * random.uniform(0.9, 1.1)

    def reset(self) -> None:
        self._next = min(self.first_s, self.max_s)
