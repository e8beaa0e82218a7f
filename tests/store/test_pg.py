"""Group commit's PostgreSQL batch (store.pg): rows written through asyncpg directly, N rows
per INSERT … unnest, read back exactly as the SQLAlchemy path would have stored them; what it
cannot translate takes the SQLAlchemy path; a bad row fails its own unit only, and is refused,
never truncated."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from tests.conftest import PG_URL

from strongroom.events.tables import events
from strongroom.idempotency.tables import idempotency_keys
from strongroom.store import group as group_module
from strongroom.store import pg
from strongroom.store.db import Database
from strongroom.store.group import GroupCommit, Guard, Write, execute

# PostgreSQL only, selected like the other PostgreSQL tests: without it (the variable unset or
# empty) there is nothing of this module to run, and it is not collected rather than skipped.
PG_PARAMS = ["postgres"] if PG_URL else []
pytestmark = pytest.mark.parametrize("database_url", PG_PARAMS, indirect=True)
__test__ = bool(PG_PARAMS)

_INSERT = events.insert()
_INSERT_RETURNING = events.insert().returning(events.c.id)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


def _row(merchant_id: str, event_id: str, **overrides: Any) -> dict[str, Any]:
    row = {
        "merchant_id": merchant_id,
        "id": event_id,
        "livemode": event_id.endswith("live"),
        "created": dt.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=dt.UTC),
        "type": "test.grouped",
        "object_id": "obj_1",
        "data": {"object": {"id": "obj_1", "amount": 2000, "name": "Zoë ☃", "nested": [1, None, {"a": True}]}},
    }
    return row | overrides


async def _stored(db: Database, merchant_id: str) -> dict[str, dict[str, Any]]:
    async with db.read() as conn:
        rows = (await conn.execute(sa.select(events).where(events.c.merchant_id == merchant_id))).mappings()
        return {row["id"]: dict(row) for row in rows}


async def test_rows_batched_through_asyncpg_read_back_as_the_sqlalchemy_path_stores_them(db: Database) -> None:
    batched, one_by_one = "acct_" + secrets.token_hex(6), "acct_" + secrets.token_hex(6)
    names = ["evt_1", "evt_2_live", "evt_3"]
    group = GroupCommit(db, max_batch=64, max_writers=1)

    results = await asyncio.gather(*(group.commit([Write(_INSERT, _row(batched, n))]) for n in names))
    async with db.tx() as conn:
        await execute(conn, [Write(_INSERT, _row(one_by_one, n)) for n in names])

    assert results == [True, True, True]
    mine, reference = await _stored(db, batched), await _stored(db, one_by_one)
    assert set(mine) == set(names)
    for name in names:
        assert {**mine[name], "merchant_id": None} == {**reference[name], "merchant_id": None}
    assert mine["evt_1"]["data"]["object"]["name"] == "Zoë ☃"
    assert mine["evt_2_live"]["livemode"] is True


async def test_an_insert_of_many_rows_is_one_statement_at_the_server(db: Database) -> None:
    plan = pg.plan(_INSERT, tuple(_row("m", "e")), db.engine.dialect)

    assert plan.unnest and plan.parameters == 1
    assert plan.sql.startswith("INSERT INTO events (")
    assert "FROM json_populate_recordset(NULL::events, $1::text::json)" in plan.sql
    # One argument: a JSON document with every row, whatever the number of rows.
    (args,) = plan.args([_row("m", f"e{n}") for n in range(5)])
    assert [record["id"] for record in orjson.loads(args[0])] == ["e0", "e1", "e2", "e3", "e4"]


async def test_a_too_long_value_is_refused_not_truncated_and_fails_its_unit_alone(db: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    group = GroupCommit(db, max_batch=64, max_writers=1)
    too_long = "t" * 65  # events.type is VARCHAR(64)

    results = await asyncio.gather(
        group.commit([Write(_INSERT, _row(merchant, "evt_ok_1"))]),
        group.commit([Write(_INSERT, _row(merchant, "evt_bad", type=too_long))]),
        group.commit([Write(_INSERT, _row(merchant, "evt_ok_2"))]),
        return_exceptions=True,
    )

    assert results[0] is True and results[2] is True
    assert isinstance(results[1], sa_exc.DBAPIError)
    assert set(await _stored(db, merchant)) == {"evt_ok_1", "evt_ok_2"}


async def test_a_statement_it_cannot_translate_takes_the_sqlalchemy_path(db: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    with pytest.raises(pg.Untranslatable):
        pg.plan(_INSERT_RETURNING, tuple(_row(merchant, "e")), db.engine.dialect)
    group = GroupCommit(db, max_batch=64, max_writers=1)

    assert await group.commit([Write(_INSERT_RETURNING, _row(merchant, "evt_returning"))])

    assert set(await _stored(db, merchant)) == {"evt_returning"}


async def test_an_update_carries_the_literal_values_of_its_statement(db: Database) -> None:
    """`.values(locked_at=None)` is part of the statement, not of the parameters: the batch must
    still set it (the stored idempotent response unlocks its key)."""
    merchant = "acct_" + secrets.token_hex(6)
    key = {"merchant_id": merchant, "livemode": False, "key_hash": b"k" * 32}
    now = dt.datetime.now(dt.UTC)
    async with db.tx() as conn:
        await conn.execute(
            idempotency_keys.insert(),
            key | {"fingerprint": b"f" * 32, "method": "POST", "path": "/v1/x", "created": now, "locked_at": now},
        )
    store = (
        idempotency_keys.update()
        .where(
            idempotency_keys.c.merchant_id == sa.bindparam("w_merchant"),
            idempotency_keys.c.livemode == sa.bindparam("w_livemode"),
            idempotency_keys.c.key_hash == sa.bindparam("w_key"),
        )
        .values(response_status=sa.bindparam("w_status"), locked_at=None)
    )
    params = {"w_merchant": merchant, "w_livemode": False, "w_key": b"k" * 32, "w_status": 201}
    group = GroupCommit(db, max_batch=64, max_writers=1)

    assert await group.commit([Write(store, params)])

    async with db.read() as conn:
        row = (await conn.execute(sa.select(idempotency_keys).where(idempotency_keys.c.merchant_id == merchant))).one()
    assert (row.response_status, row.locked_at) == (201, None)


async def test_updates_by_key_of_many_rows_are_one_statement_and_each_row_gets_its_own_values(db: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    async with db.tx() as conn:
        await execute(conn, [Write(_INSERT, _row(merchant, f"evt_{n}")) for n in range(3)])
    by_key = (
        events.update()
        .where(
            events.c.merchant_id == sa.bindparam("w_merchant"),
            events.c.livemode == sa.bindparam("w_livemode"),
            events.c.id == sa.bindparam("w_id"),
        )
        .values(type=sa.bindparam("w_type"))
    )
    params = [{"w_merchant": merchant, "w_livemode": False, "w_id": f"evt_{n}", "w_type": f"t.{n}"} for n in range(3)]
    plan = pg.plan(by_key, tuple(params[0]), db.engine.dialect)
    group = GroupCommit(db, max_batch=64, max_writers=1)

    assert plan.unnest and "FROM unnest(" in plan.sql and "= ANY(" in plan.sql
    assert await asyncio.gather(*(group.commit([Write(by_key, p)]) for p in params)) == [True] * 3

    assert {k: v["type"] for k, v in (await _stored(db, merchant)).items()} == {f"evt_{n}": f"t.{n}" for n in range(3)}


async def test_a_batch_of_several_statements_is_one_combined_statement_that_writes_them_all(db: Database) -> None:
    """Each unit inserts an event and updates another (as a payment writes its charge and updates
    its intent): the batch is ONE `WITH … SELECT` execution, and every row is written."""
    merchant = "acct_" + secrets.token_hex(6)
    async with db.tx() as conn:
        await execute(conn, [Write(_INSERT, _row(merchant, f"evt_old_{n}")) for n in range(4)])
    rename = events.update().where(
        events.c.merchant_id == sa.bindparam("w_merchant"),
        events.c.livemode == sa.bindparam("w_livemode"),
        events.c.id == sa.bindparam("w_id"),
    )
    units = [
        [
            Write(_INSERT, _row(merchant, f"evt_new_{n}")),
            Write(rename, {"w_merchant": merchant, "w_livemode": False, "w_id": f"evt_old_{n}", "object_id": f"o{n}"}),
        ]
        for n in range(4)
    ]
    plans = [pg.plan(w.statement, tuple(w.params), db.engine.dialect) for w in units[0]]
    group = GroupCommit(db, max_batch=64, max_writers=1)

    assert pg.combined(plans).startswith("WITH w0 AS (INSERT INTO events")
    assert await asyncio.gather(*(group.commit(u) for u in units)) == [True] * 4

    stored = await _stored(db, merchant)
    assert {f"evt_new_{n}" for n in range(4)} <= set(stored)
    assert [stored[f"evt_old_{n}"]["object_id"] for n in range(4)] == ["o0", "o1", "o2", "o3"]


async def test_binary_values_and_naive_timestamps_are_stored_as_sqlalchemy_stores_them(db: Database) -> None:
    """bytea travels as hex inside the JSON document; a timestamp without a zone is UTC, as
    asyncpg takes it on the SQLAlchemy path."""
    merchant = "acct_" + secrets.token_hex(6)
    raw = bytes(range(256))
    row = {
        "merchant_id": merchant,
        "livemode": False,
        "key_hash": raw[32:64],
        "fingerprint": raw[:32],
        "method": "POST",
        "path": "/v1/x",
        "created": dt.datetime(2026, 11, 30, 12, 0, 0, 5),
        "locked_at": None,
        "response_body": raw,
    }
    # Keyed as the services key their rows, by the columns' own names (SQLAlchemy's quoted_name,
    # a str subclass that orjson refuses as a JSON key: every batch failed over to one by one).
    row = {idempotency_keys.c[name].name: value for name, value in row.items()}
    group = GroupCommit(db, max_batch=64, max_writers=1)
    # The batch's own argument (a failed batch would be retried through SQLAlchemy, unseen).
    (document,) = pg.plan(idempotency_keys.insert(), tuple(row), db.engine.dialect).args([row])[0]
    assert orjson.loads(document)[0]["response_body"] == "\\x" + raw.hex()

    assert await group.commit([Write(idempotency_keys.insert(), row)])

    async with db.read() as conn:
        stored = (
            await conn.execute(sa.select(idempotency_keys).where(idempotency_keys.c.merchant_id == merchant))
        ).one()
    assert (stored.fingerprint, stored.response_body) == (raw[:32], raw)
    assert stored.created == dt.datetime(2026, 11, 30, 12, 0, 0, 5, tzinfo=dt.UTC)
    assert stored.locked_at is None


async def test_statements_on_the_driver_pool_are_planned_once_not_at_every_execution(db: Database) -> None:
    """PostgreSQL makes a custom plan for a prepared statement's first executions (and for ever, when
    custom plans look cheaper): planning a batch's many-CTE statement every time cost it about a
    fifth of its CPU per payment. The pool's connections use the generic plan from the start."""
    sql = "SELECT id FROM events WHERE merchant_id = ANY($1::varchar[]) AND id = ANY($2::varchar[])"
    async with db.raw() as conn:
        statement = await conn.prepare(sql)
        for n in range(8):
            await statement.fetch([f"acct_{n}"], [f"evt_{n}"])
        plans = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1", sql
        )
    assert plans is not None
    assert (plans["generic_plans"], plans["custom_plans"]) == (8, 0)


@pytest.mark.parametrize("guarded", [False, True], ids=["autocommit", "guarded"])
async def test_a_connection_lost_mid_batch_loses_no_unit_each_is_written_once(
    db: Database, monkeypatch: pytest.MonkeyPatch, guarded: bool
) -> None:
    """The batch's connection dies under it (a PostgreSQL restart, a failover, a killed backend):
    the batch fails as a whole and every unit is then written alone, once, on a new connection.
    Guarded: as a payment's last batch is (one statement that locks, checks and writes)."""
    merchant = "acct_" + secrets.token_hex(6)
    names = ["evt_a", "evt_b", "evt_c"]
    guards: list[Guard | None] = [None] * len(names)
    if guarded:
        async with db.tx() as conn:
            await execute(conn, [Write(_INSERT, _row(merchant, f"{n}_seed")) for n in names])
        guards = [Guard(events, merchant, False, f"{n}_seed", {"type": "test.grouped"}) for n in names]
    killed: list[int] = []

    def on_a_dying_connection(original: Any) -> Any:
        async def run(driver: Any, sql: str, args: Any) -> Any:
            if not killed:
                killed.append(driver.get_server_pid())
                async with db.raw() as other:
                    assert await other.fetchval("SELECT pg_terminate_backend($1)", killed[0])
            return await original(driver, sql, args)

        return run

    for name in ("_run", "_fetch"):  # the statements of an autocommitted batch; a guarded one's
        monkeypatch.setattr(group_module, name, on_a_dying_connection(getattr(group_module, name)))
    group = GroupCommit(db, max_batch=64, max_writers=1)

    results = await asyncio.gather(
        *(group.commit([Write(_INSERT, _row(merchant, n))], g) for n, g in zip(names, guards, strict=True))
    )

    assert killed, "the batch never ran on the asyncpg path"
    assert results == [True, True, True]
    async with db.read() as conn:
        counted = (
            await conn.execute(
                sa.select(events.c.id, sa.func.count())
                .where(events.c.merchant_id == merchant, events.c.id.in_(names))
                .group_by(events.c.id)
            )
        ).all()
    assert sorted(counted) == [(n, 1) for n in names]


async def _seed(db: Database, merchant: str, *ids: str) -> None:
    async with db.tx() as conn:
        await execute(conn, [Write(_INSERT, _row(merchant, n, type="state.a")) for n in ids])


async def test_a_guarded_batch_is_one_statement_and_writes_only_when_every_guard_holds(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All guards holding: the batch is one statement (no transaction block, no separate locking
    read) and writes every unit. One guard failing: that statement writes nothing, and the units
    whose guards hold are then written the usual way; the failing one writes nothing."""
    merchant = "acct_" + secrets.token_hex(6)
    await _seed(db, merchant, "s1", "s2", "s3")
    statements: list[str] = []
    original = group_module._fetch

    async def fetch(driver: Any, sql: str, args: tuple[Any, ...]) -> list[Any]:
        statements.append(sql)
        return await original(driver, sql, args)

    monkeypatch.setattr(group_module, "_fetch", fetch)
    group = GroupCommit(db, max_batch=64, max_writers=1)

    def unit(name: str, guarded: str, expected: str) -> Any:
        return group.commit(
            [Write(_INSERT, _row(merchant, name))], Guard(events, merchant, False, guarded, {"type": expected})
        )

    assert await asyncio.gather(unit("x1", "s1", "state.a"), unit("x2", "s2", "state.a")) == [True, True]
    assert len(statements) == 1 and "FOR UPDATE" in statements[0]
    mixed = await asyncio.gather(unit("y1", "s1", "state.a"), unit("y2", "s2", "state.b"), unit("y3", "s3", "state.a"))
    assert mixed == [True, False, True]
    assert set(await _stored(db, merchant)) == {"s1", "s2", "s3", "x1", "x2", "y1", "y3"}


async def test_a_guard_changed_by_a_transaction_the_batch_waited_for_fails_and_the_rest_commit(db: Database) -> None:
    """Another transaction holds a guarded row and changes it: the batch waits for its lock and
    then checks the row's committed new version, not the one in its snapshot. That unit writes
    nothing; the other unit of the same batch commits."""
    merchant = "acct_" + secrets.token_hex(6)
    await _seed(db, merchant, "s1", "s2")
    group = GroupCommit(db, max_batch=64, max_writers=1)
    async with db.raw() as other, db.raw() as watcher:
        changing = other.transaction()
        await changing.start()
        await other.execute("UPDATE events SET type = 'state.b' WHERE merchant_id = $1 AND id = 's1'", merchant)
        batch = asyncio.gather(
            *(
                group.commit(
                    [Write(_INSERT, _row(merchant, name))], Guard(events, merchant, False, seed, {"type": "state.a"})
                )
                for name, seed in (("x1", "s1"), ("x2", "s2"))
            )
        )
        for _ in range(100):  # until the batch waits for the row lock
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting, "the batch never waited for the row lock"
        await changing.commit()
        results = await batch
    assert results == [False, True]
    assert set(await _stored(db, merchant)) == {"s1", "s2", "x2"}


_BY_KEY = sa.select(events.c.id, events.c.type).where(
    events.c.merchant_id == sa.bindparam("m"), events.c.id == sa.bindparam("i")
)


@pytest.fixture
async def gathering(database_url: str) -> AsyncIterator[tuple[Database, list[int]]]:
    """A database whose `fetch_one` gathers lookups for 4 turns, and a count of its driver
    connection checkouts (one per statement sent)."""
    database = Database(database_url, read_gather_turns=4)
    checkouts = [0]
    raw = database.raw

    def counted() -> Any:
        checkouts[0] += 1
        return raw()

    database.raw = counted  # type: ignore[method-assign]
    database._reads._connect = counted
    yield database, checkouts
    await database.dispose()


async def test_concurrent_lookups_of_one_statement_are_one_statement_with_each_its_own_answer(
    gathering: tuple[Database, list[int]], db: Database
) -> None:
    """Lookups by key arriving together (present, absent, the same key twice) are sent as one
    statement, and each gets exactly what it would get alone (`db`, which sends each alone)."""
    database, checkouts = gathering
    merchant = "acct_" + secrets.token_hex(6)
    await _seed(database, merchant, "s1", "s2", "s3")
    keys = ["s1", "nowhere", "s2", "s1", "s3", "also_nowhere"]
    checkouts[0] = 0
    together = await asyncio.gather(*(database.fetch_one(_BY_KEY, {"m": merchant, "i": k}) for k in keys))
    assert checkouts[0] == 1
    alone = [await db.fetch_one(_BY_KEY, {"m": merchant, "i": k}) for k in keys]
    assert together == alone
    assert [row and row["id"] for row in together] == ["s1", None, "s2", "s1", "s3", None]
    assert await database.fetch_one(_BY_KEY, {"m": merchant, "i": "s2"}) == {"id": "s2", "type": "state.a"}


async def test_a_lookup_with_a_value_postgresql_refuses_fails_alone(gathering: tuple[Database, list[int]]) -> None:
    """One lookup's value fails the shared statement (a NUL byte is not text to PostgreSQL):
    each lookup then runs alone, so only that request gets the error."""
    database, _ = gathering
    merchant = "acct_" + secrets.token_hex(6)
    await _seed(database, merchant, "s1", "s2")
    results = await asyncio.gather(
        *(database.fetch_one(_BY_KEY, {"m": merchant, "i": k}) for k in ["s1", "bad\x00id", "s2"]),
        return_exceptions=True,
    )
    assert results[0] == {"id": "s1", "type": "state.a"}
    assert isinstance(results[1], Exception)
    assert results[2] == {"id": "s2", "type": "state.a"}


async def test_a_lookup_cancelled_while_gathered_leaves_the_others_answered(
    gathering: tuple[Database, list[int]],
) -> None:
    database, _ = gathering
    merchant = "acct_" + secrets.token_hex(6)
    await _seed(database, merchant, "s1", "s2")
    tasks = [asyncio.ensure_future(database.fetch_one(_BY_KEY, {"m": merchant, "i": k})) for k in ["s1", "s2"]]
    await asyncio.sleep(0)
    tasks[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert await tasks[1] == {"id": "s2", "type": "state.a"}


@pytest.mark.parametrize("started", [False, True], ids=["before-it-began", "while-gathering"])
async def test_a_gathering_task_cancelled_leaves_no_lookup_waiting(
    gathering: tuple[Database, list[int]], started: bool
) -> None:
    """Shutdown cancels the task that would send a batch (before its first step, or while it
    lets turns pass): its lookups are cancelled, not left waiting, and a later lookup of the
    same statement is answered."""
    database, _ = gathering
    merchant = "acct_" + secrets.token_hex(6)
    await _seed(database, merchant, "s1", "s2")
    waiting = asyncio.ensure_future(database.fetch_one(_BY_KEY, {"m": merchant, "i": "s1"}))
    await asyncio.sleep(0)  # the lookup is queued and its task scheduled
    (task,) = database._reads._lanes[asyncio.get_running_loop()].tasks
    if started:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, timeout=10)  # a lookup left waiting fails here, not hangs
    later = database.fetch_one(_BY_KEY, {"m": merchant, "i": "s2"})
    assert await asyncio.wait_for(later, timeout=10) == {"id": "s2", "type": "state.a"}
