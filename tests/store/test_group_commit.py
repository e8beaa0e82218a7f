"""Group commit (store.group): concurrent requests' final writes share transactions, and each
request's writes still commit all together or not at all, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from tests.store.writes import event_write

from strongroom.events.tables import events
from strongroom.store import group as group_module
from strongroom.store.db import Database
from strongroom.store.group import GroupCommit, Guard, Write


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


async def _ids(db: Database, merchant_id: str) -> set[str]:
    async with db.read() as conn:
        rows = await conn.execute(sa.select(events.c.id).where(events.c.merchant_id == merchant_id))
        return {r.id for r in rows}


def _count_commits(db: Database) -> list[int]:
    """Commits through SQLAlchemy (SQLite's path; PostgreSQL batches bypass it: see _transactions)."""
    commits = [0]

    @event.listens_for(db.engine.sync_engine, "commit")
    def _on_commit(conn: Any) -> None:
        commits[0] += 1

    return commits


async def _transactions(db: Database, merchant_id: str, commits: list[int]) -> int:
    """How many transactions wrote this merchant's events: on PostgreSQL the distinct inserting
    transaction ids (xmin) of the rows themselves, on SQLite the commits counted."""
    if db.dialect != "postgresql":
        return commits[0]
    async with db.read() as conn:
        query = sa.text("SELECT count(DISTINCT xmin::text) FROM events WHERE merchant_id = :m")
        return int(await conn.scalar(query, {"m": merchant_id}) or 0)


async def test_concurrent_units_share_transactions_and_every_write_commits(db: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1)
    commits = _count_commits(db)
    units = [[event_write(merchant, f"evt_{n}_a"), event_write(merchant, f"evt_{n}_b")] for n in range(30)]

    results = await asyncio.gather(*(group.commit(writes) for writes in units))

    assert results == [True] * 30
    assert await _ids(db, merchant) == {f"evt_{n}_{s}" for n in range(30) for s in "ab"}
    # The first unit starts a transaction alone; the 29 that arrive meanwhile share the next ones.
    assert await _transactions(db, merchant, commits) < 30


async def test_a_failing_unit_fails_alone_and_writes_nothing_while_the_others_commit(db: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1)
    assert await group.commit([event_write(merchant, "evt_taken")])
    units = [[event_write(merchant, f"evt_{n}"), event_write(merchant, f"evt_{n}_second")] for n in range(9)]
    # Its second write collides with an existing row: its first write must not survive either.
    bad = [event_write(merchant, "evt_bad_first"), event_write(merchant, "evt_taken")]

    with structlog.testing.capture_logs() as logs:
        results = await asyncio.gather(
            *(group.commit(w) for w in [*units[:5], bad, *units[5:]]), return_exceptions=True
        )

    # The failed batch is reported (by the error's type: no row values in the log).
    failed = [e for e in logs if e["event"] == "store.group_commit_batch_failed"]
    assert failed and all(set(e) == {"event", "log_level", "error", "units"} for e in failed)

    assert isinstance(results[5], sa_exc.IntegrityError)
    assert [r for n, r in enumerate(results) if n != 5] == [True] * 9
    expected = {"evt_taken"} | {f"evt_{n}" for n in range(9)} | {f"evt_{n}_second" for n in range(9)}
    assert await _ids(db, merchant) == expected


async def test_a_unit_whose_guard_no_longer_holds_writes_nothing(db: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1)
    assert await group.commit([event_write(merchant, "evt_state", type_="state.a")])

    def guard(expected_type: str) -> Guard:
        return Guard(events, merchant, False, "evt_state", {"type": expected_type})

    held, stale, missing = await asyncio.gather(
        group.commit([event_write(merchant, "evt_held")], guard("state.a")),
        group.commit([event_write(merchant, "evt_stale")], guard("state.b")),
        group.commit(
            [event_write(merchant, "evt_missing")], Guard(events, merchant, False, "evt_nowhere", {"type": "state.a"})
        ),
    )

    assert (held, stale, missing) == (True, False, False)
    assert await _ids(db, merchant) == {"evt_state", "evt_held"}


async def test_batches_never_exceed_their_bound(db: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=4, max_writers=1)
    commits = _count_commits(db)

    await asyncio.gather(*(group.commit([event_write(merchant, f"evt_{n}")]) for n in range(17)))

    assert len(await _ids(db, merchant)) == 17
    # 1 alone, then 16 queued in batches of at most 4.
    assert await _transactions(db, merchant, commits) >= 5


async def test_a_unit_queued_as_the_writer_finishes_is_still_written(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that reaches `commit` in the same loop iteration in which the writer found its
    queue empty must get a writer of its own. The writer's task is finished by then, but its
    done-callbacks (which removed it from the lane) had not run yet, so the new unit waited for the
    NEXT request to start a writer, and when requests come in rounds there is none (seen on the
    benchmark: a request in a few hundred hung for good; 335 such moments in a 10 s run)."""
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1)
    later: list[asyncio.Task[bool]] = []
    real_settle = group_module._settle

    def settle_then_another_arrives(unit: Any, ok: bool) -> None:
        real_settle(unit, ok)
        if not later:
            # Scheduled now, so it runs right after the writer's current step ends: after the
            # writer has left its loop, before the writer task's done-callbacks.
            later.append(asyncio.get_running_loop().create_task(group.commit([event_write(merchant, "evt_second")])))

    monkeypatch.setattr(group_module, "_settle", settle_then_another_arrives)

    assert await group.commit([event_write(merchant, "evt_first")])
    assert await asyncio.wait_for(later[0], timeout=10)
    assert await _ids(db, merchant) == {"evt_first", "evt_second"}


@pytest.mark.parametrize(("turns", "transactions"), [(0, 2), (4, 1)])
async def test_a_unit_committed_a_turn_after_another_joins_its_batch_when_the_writer_gathers(
    db: Database, turns: int, transactions: int
) -> None:
    """A writer that lets event-loop turns pass before taking its batch (`gather_turns`) takes
    a unit committed a turn later into the same transaction; one that does not, writes the first
    unit alone. Both units are written either way."""
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1, gather_turns=turns)
    commits = _count_commits(db)
    first = asyncio.ensure_future(group.commit([event_write(merchant, "evt_first")]))
    await asyncio.sleep(0)  # the first unit is queued and its writer scheduled
    # The second is queued one turn later, after the writer's first step (asyncio runs ready
    # callbacks in order): a writer that does not gather has taken the first unit alone by then.
    second = group.commit([event_write(merchant, "evt_second")])
    assert await asyncio.gather(first, second) == [True, True]
    assert await _ids(db, merchant) == {"evt_first", "evt_second"}
    assert await _transactions(db, merchant, commits) == transactions


async def test_a_writer_cancelled_before_it_began_leaves_no_unit_waiting_and_a_later_commit_writes(
    db: Database,
) -> None:
    """Shutdown cancels a writer before its first step: the unit it was to write is cancelled
    (its request is not left waiting), and the lane is not left counting a dead writer: the next
    commit starts a new one and is written."""
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1)
    waiting = asyncio.ensure_future(group.commit([event_write(merchant, "evt_cancelled")]))
    await asyncio.sleep(0)  # the unit is queued and its writer scheduled, not yet run
    (writer,) = group._lanes[asyncio.get_running_loop()].writers
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, timeout=10)  # a unit left waiting fails here, not hangs
    assert await asyncio.wait_for(group.commit([event_write(merchant, "evt_later")]), timeout=10) is True
    assert await _ids(db, merchant) == {"evt_later"}


async def test_a_request_cancelled_while_waiting_leaves_the_batch_to_the_others(db: Database) -> None:
    """A request cancelled (its client gone) while its unit waits for the batch: the others'
    commits answer True, and the cancelled unit's writes, handed over already, are committed with
    them; the cancellation reaches only the request that was cancelled."""
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1, gather_turns=2)
    tasks = [asyncio.ensure_future(group.commit([event_write(merchant, f"evt_{n}")])) for n in range(4)]
    await asyncio.sleep(0)  # queued; the writer lets turns pass before taking them
    tasks[1].cancel()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [results[n] for n in (0, 2, 3)] == [True, True, True]
    assert await _ids(db, merchant) == {"evt_0", "evt_1", "evt_2", "evt_3"}
    # The lane is left working: a later commit is written.
    assert await asyncio.wait_for(group.commit([event_write(merchant, "evt_later")]), timeout=10) is True


async def test_a_batch_with_a_statement_asyncpg_has_no_plan_for_is_written_the_sqlalchemy_way_each_time(
    db: Database,
) -> None:
    """An expanding IN parameter has no asyncpg plan (store.pg refuses it): a batch holding such
    a unit goes through SQLAlchemy, the first time and again once that answer is remembered for
    its shape, and every unit's writes land."""
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1)
    delete = events.delete().where(
        events.c.merchant_id == sa.bindparam("m"), events.c.id.in_(sa.bindparam("ids", expanding=True))
    )
    assert await group.commit([event_write(merchant, "evt_doomed_one"), event_write(merchant, "evt_doomed_two")])
    commits = _count_commits(db)  # SQLAlchemy's transactions (PostgreSQL's batches bypass it)
    for round_ in ("one", "two"):
        before = commits[0]
        expanding = [
            Write(delete, {"m": merchant, "ids": [f"evt_doomed_{round_}"]}),
            event_write(merchant, f"evt_{round_}"),
        ]
        plain = [[event_write(merchant, f"evt_{round_}_{n}")] for n in range(5)]
        with structlog.testing.capture_logs() as logs:
            results = await asyncio.gather(*(group.commit(w) for w in [plain[0], expanding, *plain[1:]]))
        assert results == [True] * 6
        # Through SQLAlchemy, on PostgreSQL too, both times: chosen, not reached by a failed batch.
        assert commits[0] > before
        assert not [e for e in logs if e["event"] == "store.group_commit_batch_failed"]
    assert await _ids(db, merchant) == {
        f"evt_{r}{s}" for r in ("one", "two") for s in ("", *(f"_{n}" for n in range(5)))
    }
