"""Per-key rate limits on the expensive routes: a fixed window counter in Redis, shared by every API replica.

One ``INCR`` + ``EXPIRE`` per request in a pipeline (one round trip). Over the limit → 429 in the envelope
with ``Retry-After`` = the seconds until the window turns. When Redis is unreachable the limiter lets
requests through (generation does not need Redis and must keep serving); it then skips Redis for a few
seconds instead of paying a connect timeout per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import redis
from fastapi import Request

from core.errors import RateLimited
from core.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "bone:ratelimit:"
REDIS_DOWN_SKIP_S = 5.0

# (method, route path) → bucket. Route paths as FastAPI declares them, so path parameters never matter.
BUCKETS: dict[tuple[str, str], str] = {
    ("POST", "/jobs"): "training",
    ("POST", "/files"): "training",
    ("POST", "/adapters"): "training",  # import: a publish, like a finished job
    ("POST", "/adapters/{name}/compose"): "training",  # a publish too: unbounded, it floods the registry
    ("POST", "/evals"): "training",  # an eval occupies a worker like a training job
    ("POST", "/generate"): "generation",
    ("POST", "/v1/completions"): "generation",
    ("POST", "/v1/chat/completions"): "generation",
}


def bucket_for(method: str, path: str) -> str | None:
    return BUCKETS.get((method, path))


class RateLimiter:
    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        self.conn = conn
        self.window_s = settings.rate_limit_window_s
        self.limits = {"training": settings.rate_limit_training, "generation": settings.rate_limit_generation}
        self._skip_until = 0.0
        self._lock = threading.Lock()

    def hit(self, bucket: str, identity: str) -> None:
        """Count one request of ``identity`` in ``bucket``; raise RateLimited when it is one too many."""
        limit = self.limits.get(bucket, 0)
        if limit <= 0 or time.monotonic() < self._skip_until:
            return
        now = time.time()
        window = int(now // self.window_s)
        key = f"{KEY_PREFIX}{bucket}:{identity}:{window}"
        try:
            pipe = self.conn.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, self.window_s + 1)
            count, _ = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            with self._lock:
                self._skip_until = time.monotonic() + REDIS_DOWN_SKIP_S
            log.warning("rate limit not enforced: Redis unreachable (%s)", exc)
            return
        if count > limit:
            retry_after = max(1, math.ceil((window + 1) * self.window_s - now))
            raise RateLimited(
                f"rate limit exceeded: {limit} {bucket} requests per {self.window_s} s for this key; "
                f"retry in {retry_after} s",
                retry_after=retry_after,
            )


def get_rate_limiter(request: Request) -> RateLimiter:
    state = request.app.state
    limiter = getattr(state, "rate_limiter", None)
    if limiter is None or limiter.conn is not state.redis:
        limiter = state.rate_limiter = RateLimiter(state.redis, state.settings)
    return limiter
