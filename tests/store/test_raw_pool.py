"""`Database.raw()`: the asyncpg pool of the hot statements. A free connection is handed over at
once; with all of them out, the next caller waits `pool_timeout_s` and is refused, and the count
of connections out stays right whatever the callers did with theirs. PostgreSQL only (the pool is
asyncpg's), selected like the other PostgreSQL tests."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from strongroom.store.db import Database

PG_PARAMS = ["postgres"] if os.environ.get("STRONGROOM_TEST_DATABASE_URL") else []
pytestmark = pytest.mark.parametrize("database_url", PG_PARAMS, indirect=True)
__test__ = bool(PG_PARAMS)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, raw_pool_size=2, pool_timeout_s=0.3)
    yield database
    await database.dispose()


async def test_with_every_connection_out_the_next_caller_is_refused_after_the_pool_timeout(db: Database) -> None:
    async with db.raw() as first, db.raw() as second:
        assert first is not second

        async def third() -> None:
            async with db.raw():
                pass

        started = time.monotonic()
        with pytest.raises(TimeoutError):
            # The pool's own timeout, not this guard (a caller that waited without one would
            # hang here until the guard, 5 s).
            await asyncio.wait_for(third(), 5)
        assert 0.25 <= time.monotonic() - started < 2
    # Both back: two callers at once are served again, each with a working connection.
    async with db.raw() as first, db.raw() as second:
        assert await first.fetchval("SELECT 1") == 1
        assert await second.fetchval("SELECT 2") == 2


async def test_a_caller_waiting_for_a_connection_gets_the_one_handed_back(db: Database) -> None:
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with db.raw():
            held.set()
            await release.wait()

    holders = [asyncio.create_task(hold()), asyncio.create_task(hold())]
    await held.wait()
    await asyncio.sleep(0)

    async def late() -> int:
        async with db.raw() as conn:
            value: int = await conn.fetchval("SELECT 3")
            return value

    waiting = asyncio.create_task(late())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    release.set()
    assert await asyncio.wait_for(waiting, 1) == 3
    await asyncio.gather(*holders)


async def test_a_failed_statement_or_a_cancelled_caller_gives_its_connection_back(db: Database) -> None:
    for _ in range(3):  # more failures than connections: a leaked one would leave none
        with pytest.raises(Exception, match="division by zero"):
            async with db.raw() as conn:
                await conn.fetchval("SELECT 1 / 0")

    async def slow() -> None:
        async with db.raw() as conn:
            await conn.execute("SELECT pg_sleep(5)")

    for _ in range(3):
        task = asyncio.create_task(slow())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with db.raw() as first, db.raw() as second:
        assert await first.fetchval("SELECT 1") == await second.fetchval("SELECT 1") == 1
