"""Rate limits for the public endpoints (PCI DSS 6.4.1/6.4.2, SECURITY.md P10).

A limit is a count per fixed window: `hit(key, limit)` counts one request against `key` in the
current window and says whether it may go on, and if not, in how many seconds the window ends
(the 429's `Retry-After`). Fixed windows admit at most twice the limit across a window's edge;
for turning away card testing and secret guessing that is enough, and it costs one counter.

Two backends, chosen by settings as the keystore is: Redis when `redis_url` is set, shared by
every process and host; otherwise counters in this process (the embedded default). If Redis
cannot be reached, the process falls back to its own counters and logs it, so an outage weakens
the limit to per-process rather than switching it off or turning every customer away.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from redis import asyncio as aioredis
from redis.exceptions import RedisError
from starlette.requests import Request

from strongroom.errors import RateLimited
from strongroom.settings import RateLimitSettings, Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Limit:
    count: int
    window_s: int


class Limiter(Protocol):
    async def hit(self, key: str, limit: Limit) -> float | None:
        """Counts one request against `key`: None if allowed, else seconds until it may retry."""

    async def aclose(self) -> None:
        """Release connections."""


class MemoryLimiter:
    """Fixed windows in this process, at most `max_keys` counters (the oldest are forgotten)."""

    def __init__(self, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_keys = max_keys
        self._clock = clock
        self._counters: OrderedDict[str, tuple[int, int]] = OrderedDict()

    async def hit(self, key: str, limit: Limit) -> float | None:
        now = self._clock()
        window = int(now // limit.window_s)
        full_key = f"{key}:{limit.window_s}"
        seen_window, count = self._counters.pop(full_key, (window, 0))
        count = count + 1 if seen_window == window else 1
        self._counters[full_key] = (window, count)
        while len(self._counters) > self._max_keys:
            self._counters.popitem(last=False)
        if count <= limit.count:
            return None
        return _retry_after(now, window, limit.window_s)

    async def aclose(self) -> None:
        self._counters.clear()


class RedisLimiter:
    """Fixed windows in Redis: one INCR per request on a key that expires with its window."""

    def __init__(self, client: aioredis.Redis, prefix: str, fallback: MemoryLimiter) -> None:
        self._client = client
        self._prefix = prefix
        self._fallback = fallback

    async def hit(self, key: str, limit: Limit) -> float | None:
        now = time.time()
        window = int(now // limit.window_s)
        redis_key = f"{self._prefix}{key}:{limit.window_s}:{window}"
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incr(redis_key)
                # A whole window past its end, so clocks a little apart between hosts agree.
                pipe.expire(redis_key, 2 * limit.window_s)
                count, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.error("ratelimit.redis_unavailable", error_type=type(exc).__name__)
            return await self._fallback.hit(key, limit)
        if int(count) <= limit.count:
            return None
        return _retry_after(now, window, limit.window_s)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._fallback.aclose()


class Exceeded(RateLimited):
    """429 with the seconds until the window ends (Retry-After)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("Too many requests. Retry later.")
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(int(self.retry_after_s))}


async def check(limiter: Limiter, key: str, limit: Limit) -> None:
    """Counts one request against `key`; raises `Exceeded` once it is over `limit`."""
    retry_after_s = await limiter.hit(key, limit)
    if retry_after_s is not None:
        raise Exceeded(retry_after_s)


def client_ip(request: Request) -> str:
    # The peer address; behind a proxy, uvicorn's --proxy-headers (forwarded-allow-ips) sets it.
    return request.client.host if request.client is not None else "unknown"


def _retry_after(now: float, window: int, window_s: int) -> float:
    return max(1.0, math.ceil((window + 1) * window_s - now))


def build(settings: Settings) -> Limiter:
    limits: RateLimitSettings = settings.ratelimit
    memory = MemoryLimiter(limits.memory_max_keys)
    if not settings.redis_url:
        return memory
    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    return RedisLimiter(client, limits.key_prefix, memory)
