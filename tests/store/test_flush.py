"""The flush scheduler (store.flush): one lane's statement at a time per loop, the fullest lane
first, a lane that waited `max_wait_s` first whatever its size, a slow flush never holding the
others, and no unit left waiting when a flush fails or the scheduler stops. Then the same with
real group commits and group reads on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing
from tests.store.writes import event_write

from strongroom.events.tables import events
from strongroom.store import flush as flush_module
from strongroom.store.db import Database
from strongroom.store.flush import FlushScheduler
from strongroom.store.group import GroupCommit


class FakeLane:
    """Units are futures; a flush answers them all (after `hold`, if given) and logs its name."""

    def __init__(self, name: str, log: list[str], hold: asyncio.Event | None = None) -> None:
        self.name, self.log, self.hold = name, log, hold
        self.units: list[asyncio.Future[str]] = []

    def add(self, scheduler: FlushScheduler, count: int = 1) -> list[asyncio.Future[str]]:
        loop = asyncio.get_running_loop()
        new = [loop.create_future() for _ in range(count)]
        self.units.extend(new)
        scheduler.ready(self.name, lambda: len(self.units), self.flush, self.abort)
        return new

    async def flush(self) -> None:
        batch, self.units = self.units, []
        self.log.append(f"{self.name}:{len(batch)}")
        if self.hold is not None:
            await self.hold.wait()
        for unit in batch:
            unit.set_result(self.name)

    def abort(self) -> None:
        for unit in self.units:
            unit.cancel()
        self.units = []


async def test_the_fullest_lane_goes_first() -> None:
    scheduler, log = FlushScheduler(max_wait_s=10), []
    lanes = {name: FakeLane(name, log) for name in "abc"}
    units = [*lanes["a"].add(scheduler, 1), *lanes["b"].add(scheduler, 3), *lanes["c"].add(scheduler, 2)]
    assert await asyncio.wait_for(asyncio.gather(*units), 5) == ["a", "b", "b", "b", "c", "c"]
    assert log == ["b:3", "c:2", "a:1"]


async def test_a_unit_arriving_a_turn_later_joins_its_lanes_batch() -> None:
    """The scheduler lets the loop run while units keep arriving: one queued a turn after the
    first (as a request a step from its statement) is in the same flush."""
    scheduler, log = FlushScheduler(max_wait_s=10), []
    lane = FakeLane("a", log)
    first = lane.add(scheduler)
    await asyncio.sleep(0)  # the scheduler's first look: one unit
    second = lane.add(scheduler)
    assert await asyncio.wait_for(asyncio.gather(*first, *second), 5) == ["a", "a"]
    assert log == ["a:2"]


async def test_a_lane_that_waited_max_wait_goes_before_a_fuller_one() -> None:
    scheduler, log = FlushScheduler(max_wait_s=0.02), []
    hold = asyncio.Event()
    slow, small, full = FakeLane("slow", log, hold), FakeLane("small", log), FakeLane("full", log)
    slow.add(scheduler)
    small_units = small.add(scheduler, 1)  # as full as slow, later: slow's flush goes first
    await asyncio.sleep(0.012)  # slow's flush is out; the scheduler waits on it up to 20 ms
    full_units = full.add(scheduler, 5)  # fuller, but younger than max_wait when the next is chosen
    await asyncio.wait_for(asyncio.gather(*small_units, *full_units), 5)
    assert log[:3] == ["slow:1", "small:1", "full:5"]
    hold.set()


async def test_a_slow_flush_does_not_hold_the_other_lanes() -> None:
    scheduler, log = FlushScheduler(max_wait_s=0.01), []
    hold = asyncio.Event()
    stuck = FakeLane("stuck", log, hold)
    (stuck_unit,) = stuck.add(scheduler)
    await asyncio.sleep(0.001)
    other = FakeLane("other", log)
    # Answered while the stuck flush (a lock wait, say) is still out.
    assert await asyncio.wait_for(asyncio.gather(*other.add(scheduler, 2)), 1) == ["other", "other"]
    assert not stuck_unit.done()
    hold.set()
    assert await asyncio.wait_for(stuck_unit, 1) == "stuck"


async def test_no_more_than_four_flushes_are_out_at_once() -> None:
    scheduler, log = FlushScheduler(max_wait_s=0.001), []
    hold = asyncio.Event()
    lanes = [FakeLane(f"l{n}", log, hold) for n in range(6)]
    units = [unit for lane in lanes for unit in lane.add(scheduler)]
    await asyncio.sleep(0.1)
    assert len(log) == flush_module._MAX_IN_FLIGHT == 4  # two wait for a free place
    hold.set()
    await asyncio.wait_for(asyncio.gather(*units), 5)
    assert len(log) == 6


async def test_a_flush_that_fails_cancels_its_lanes_units_and_the_others_go_on() -> None:
    scheduler, log = FlushScheduler(max_wait_s=10), []

    class Broken(FakeLane):
        async def flush(self) -> None:
            raise RuntimeError("a bug in a lane's flush")

    broken, fine = Broken("broken", log), FakeLane("fine", log)
    with structlog.testing.capture_logs() as logs:
        broken_units = broken.add(scheduler, 3)
        fine_units = fine.add(scheduler, 1)
        assert await asyncio.wait_for(asyncio.gather(*fine_units), 5) == ["fine"]
        results = await asyncio.wait_for(asyncio.gather(*broken_units, return_exceptions=True), 5)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert [e["error"] for e in logs if e["event"] == "store.flush_failed"] == ["RuntimeError"]
    # The scheduler still serves: a later unit of the same lane kind is flushed.
    assert await asyncio.wait_for(asyncio.gather(*fine.add(scheduler)), 5) == ["fine"]


async def test_when_the_scheduler_stops_no_unit_is_left_waiting() -> None:
    scheduler, log = FlushScheduler(max_wait_s=10), []
    hold = asyncio.Event()
    first, second = FakeLane("first", log, hold), FakeLane("second", log)
    first.add(scheduler)
    await asyncio.sleep(0.001)  # first's flush is out; the scheduler waits on it
    waiting = second.add(scheduler, 2)
    (state,) = scheduler._loops.values()
    assert state.task is not None
    state.task.cancel()  # shutdown
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    hold.set()


# The same with real lanes: group commits and group reads sharing one scheduler.

_BY_ID = sa.select(events.c.id, events.c.type).where(
    events.c.merchant_id == sa.bindparam("m"), events.c.id == sa.bindparam("i")
)


@pytest.fixture
async def scheduled(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, read_gather_turns=4, flush_max_wait_s=0.002)
    yield database
    await database.dispose()


async def test_requests_committing_reading_and_committing_again_all_land_in_shared_statements(
    scheduled: Database,
) -> None:
    """30 requests, each: commit a row (one group commit), read it back (group reads), commit a
    second row (another group commit). Every read finds its own row, every row is written, and
    the 60 rows take far fewer transactions than 60."""
    merchant = "acct_" + secrets.token_hex(6)
    first_lane = GroupCommit(scheduled, max_batch=64, max_writers=1, gather_turns=4)
    second_lane = GroupCommit(scheduled, max_batch=64, max_writers=1, gather_turns=4)

    async def request(n: int) -> dict[str, object] | None:
        assert await first_lane.commit([event_write(merchant, f"evt_{n}_a", "test.first")])
        row = await scheduled.fetch_one(_BY_ID, {"m": merchant, "i": f"evt_{n}_a"})
        assert await second_lane.commit([event_write(merchant, f"evt_{n}_b", "test.second")])
        return row

    rows = await asyncio.wait_for(asyncio.gather(*(request(n) for n in range(30))), 30)
    assert rows == [{"id": f"evt_{n}_a", "type": "test.first"} for n in range(30)]
    async with scheduled.read() as conn:
        ids = set((await conn.execute(sa.select(events.c.id).where(events.c.merchant_id == merchant))).scalars())
        assert ids == {f"evt_{n}_{s}" for n in range(30) for s in "ab"}
        if scheduled.dialect == "postgresql":
            query = sa.text("SELECT count(DISTINCT xmin::text) FROM events WHERE merchant_id = :m")
            assert int(await conn.scalar(query, {"m": merchant}) or 0) <= 10


async def test_a_failing_unit_fails_alone_under_the_scheduler(scheduled: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    lane = GroupCommit(scheduled, max_batch=64, max_writers=1, gather_turns=4)
    assert await lane.commit([event_write(merchant, "evt_taken", "test.first")])
    units = [[event_write(merchant, f"evt_{n}", "test.first")] for n in range(5)]
    bad = [event_write(merchant, "evt_bad_first", "test.first"), event_write(merchant, "evt_taken", "test.first")]
    results = await asyncio.wait_for(
        asyncio.gather(*(lane.commit(w) for w in [*units[:2], bad, *units[2:]]), return_exceptions=True), 30
    )
    assert isinstance(results[2], Exception)
    assert [r for n, r in enumerate(results) if n != 2] == [True] * 5
    async with scheduled.read() as conn:
        ids = set((await conn.execute(sa.select(events.c.id).where(events.c.merchant_id == merchant))).scalars())
    assert ids == {"evt_taken"} | {f"evt_{n}" for n in range(5)}


async def test_a_lane_registered_again_by_units_its_flush_took_writes_no_empty_batch(scheduled: Database) -> None:
    """Units that arrive after the scheduler chose a lane but before its flush began go with that
    flush and register the lane again: that second turn finds nothing and sends nothing (it used
    to send an empty batch: on PostgreSQL a statement refused, logged as a failed batch)."""
    merchant = "acct_" + secrets.token_hex(6)
    lane = GroupCommit(scheduled, max_batch=64, max_writers=1, gather_turns=4)
    sizes: list[int] = []
    batch = lane._batch

    async def recorded(units: list[Any]) -> list[bool]:
        sizes.append(len(units))
        return await batch(units)

    lane._batch = recorded  # type: ignore[method-assign]
    for delay in range(10):  # the second unit a few turns after the first: one lands in the gap
        first = asyncio.ensure_future(lane.commit([event_write(merchant, f"evt_{delay}_a", "test.first")]))
        for _ in range(delay):
            await asyncio.sleep(0)
        second = lane.commit([event_write(merchant, f"evt_{delay}_b", "test.first")])
        assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [True, True]
    await asyncio.sleep(0.01)
    assert sizes and 0 not in sizes
    assert sum(sizes) == 20


async def test_a_request_cancelled_while_waiting_leaves_the_others_answered_and_its_writes_committed(
    scheduled: Database,
) -> None:
    """Its client gone while its unit waits for the scheduler: only that request is cancelled,
    the others are answered True, and its writes, handed over already, are committed with theirs."""
    merchant = "acct_" + secrets.token_hex(6)
    lane = GroupCommit(scheduled, max_batch=64, max_writers=1, gather_turns=4)
    tasks = [asyncio.ensure_future(lane.commit([event_write(merchant, f"evt_{n}")])) for n in range(4)]
    await asyncio.sleep(0)  # queued; the scheduler gathers before it flushes
    tasks[1].cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [results[n] for n in (0, 2, 3)] == [True, True, True]
    async with scheduled.read() as conn:
        ids = set((await conn.execute(sa.select(events.c.id).where(events.c.merchant_id == merchant))).scalars())
    assert ids == {"evt_0", "evt_1", "evt_2", "evt_3"}
    assert await asyncio.wait_for(lane.commit([event_write(merchant, "evt_later")]), 10) is True
