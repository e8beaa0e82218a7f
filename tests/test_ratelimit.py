"""PCI DSS 6.4.1/6.4.2 (SECURITY.md P10): the rate limiter's two backends.

The Redis backend runs against the machine's real Redis (STRONGROOM_TEST_REDIS_URL, default
127.0.0.1:6379), each test under its own key prefix so runs never share counters.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from strongroom import ratelimit
from strongroom.ratelimit import Limit, MemoryLimiter, RedisLimiter
from strongroom.settings import Settings

REDIS_URL = os.environ.get("STRONGROOM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_pci_6_4_2_memory_limiter_refuses_past_the_limit_until_the_window_ends():
    clock = Clock(1_000.0)
    limiter = MemoryLimiter(max_keys=100, clock=clock)
    limit = Limit(count=3, window_s=60)

    answers = [await limiter.hit("ip:1", limit) for _ in range(5)]
    other = await limiter.hit("ip:2", limit)
    clock.now = 1_020.0
    still = await limiter.hit("ip:1", limit)
    clock.now = 1_080.0
    next_window = await limiter.hit("ip:1", limit)

    assert answers[:3] == [None, None, None]
    # 1000 s is 40 s into the window [960, 1020): the client may retry in 20 s.
    assert answers[3:] == [20.0, 20.0]
    assert other is None
    assert next_window is None
    assert still is None  # 1020 starts the next window


async def test_memory_limiter_forgets_its_oldest_counters_beyond_its_bound():
    limiter = MemoryLimiter(max_keys=2, clock=Clock())
    limit = Limit(count=1, window_s=60)
    await limiter.hit("a", limit)
    await limiter.hit("b", limit)
    await limiter.hit("c", limit)

    assert await limiter.hit("c", limit) is not None
    assert await limiter.hit("a", limit) is None  # forgotten, counted afresh


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        # The machine's real Redis: unreachable is a failure, never a skip.
        await client.ping()
    except (RedisError, OSError):
        await client.aclose()
        raise
    yield client
    await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"strongroom-test:{secrets.token_hex(8)}:"


async def test_pci_6_4_2_redis_limiter_counts_across_processes(redis_client, prefix):
    """Two api processes (two limiters, two connections) share one count in Redis."""
    first = ratelimit.build(Settings(redis_url=REDIS_URL, ratelimit={"key_prefix": prefix}))
    second = ratelimit.build(Settings(redis_url=REDIS_URL, ratelimit={"key_prefix": prefix}))
    assert isinstance(first, RedisLimiter)
    limit = Limit(count=4, window_s=3600)
    try:
        answers = [await limiter.hit("card_form:ip:203.0.113.9", limit) for limiter in (first, second) * 3]
    finally:
        await first.aclose()
        await second.aclose()

    assert answers[:4] == [None] * 4
    assert all(wait is not None and 1 <= wait <= 3600 for wait in answers[4:])
    keys = [key async for key in redis_client.scan_iter(match=f"{prefix}*")]
    assert len(keys) == 1
    # The counter expires on its own: Redis keeps nothing past two windows.
    assert 0 < await redis_client.ttl(keys[0]) <= 2 * 3600
    await redis_client.delete(*keys)


async def test_pci_6_4_2_redis_outage_falls_back_to_the_process_own_counters(prefix):
    unreachable = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    limiter = RedisLimiter(unreachable, prefix, MemoryLimiter(max_keys=10))
    limit = Limit(count=2, window_s=60)
    try:
        answers = [await limiter.hit("3ds:ip:198.51.100.7", limit) for _ in range(3)]
    finally:
        await limiter.aclose()

    assert answers[:2] == [None, None]
    assert answers[2] is not None


def test_limiter_is_chosen_by_settings():
    assert isinstance(ratelimit.build(Settings()), MemoryLimiter)
    assert isinstance(ratelimit.build(Settings(redis_url=REDIS_URL)), RedisLimiter)


async def test_exceeded_is_a_429_rate_limit_error_with_retry_after():
    limiter = MemoryLimiter(max_keys=10, clock=Clock(0.0))
    await ratelimit.check(limiter, "k", Limit(1, 30))
    with pytest.raises(ratelimit.Exceeded) as raised:
        await ratelimit.check(limiter, "k", Limit(1, 30))
    assert raised.value.http_status == 429
    assert raised.value.as_dict()["type"] == "rate_limit_error"
    assert raised.value.headers() == {"Retry-After": "30"}
