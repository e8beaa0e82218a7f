"""Migrations create exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import create_async_engine
from tests.conftest import DATABASES, PG_URL, _admin, _fresh_postgres_database

from strongroom.store.migrate import alembic_config, upgrade


def test_migrations_at_head_match_the_declared_tables(database_url: str) -> None:
    # `alembic check` fails if autogenerate finds any difference between the migrated database
    # (the session's, migrated to head by the fixture) and the tables the domains declare.
    command.check(alembic_config(database_url))


async def _query(url: str, statement: str, **params: object) -> list[tuple[object, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(sa.text(statement), params)
            return [tuple(row) for row in result.all()] if result.returns_rows else []
    finally:
        await engine.dispose()


def _fresh(backend: str, tmp_path: Path) -> tuple[str, Callable[[], None]]:
    """An empty database of this backend, and how to drop it."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}", lambda: None
    assert PG_URL is not None
    name, url = _fresh_postgres_database(PG_URL)
    return url, lambda: asyncio.run(_admin(PG_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _index_definition(url: str) -> str:
    if url.startswith("sqlite"):
        statement = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'ix_payment_intents_pending'"
    else:
        statement = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_payment_intents_pending'"
    ((definition,),) = asyncio.run(_query(url, statement))
    return str(definition)


@pytest.mark.parametrize("backend", DATABASES)
def test_0008_0009_up_and_down_keep_an_event_written_before_them(backend: str, tmp_path: Path) -> None:
    """An event stored before 0008 (as jsonb on PostgreSQL) reads back the same after the change to
    json and after the downgrade; 0009 makes the sweep's index partial (an intent whose processor
    call is over has no entry) and the downgrade makes it whole again."""
    url, drop = _fresh(backend, tmp_path)
    data = {"object": {"id": "pi_1", "object": "payment_intent", "amount": 2000, "metadata": {"k": "v"}}}
    columns = "INSERT INTO events (merchant_id, id, livemode, created, type, object_id, data) "
    values = "VALUES ('acct_1', 'evt_1', false, CURRENT_TIMESTAMP, 'payment_intent.created', 'pi_1', "
    insert = columns + values + ("CAST(:data AS jsonb))" if backend == "postgres" else ":data)")
    read = "SELECT data FROM events WHERE id = 'evt_1'"
    column_type = (
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'events' AND column_name = 'data'"
    )

    def stored() -> object:
        ((value,),) = asyncio.run(_query(url, read))
        return json.loads(value) if isinstance(value, str) else value

    try:
        upgrade(url, "0007")
        asyncio.run(_query(url, insert, data=json.dumps(data)))
        assert "WHERE" not in _index_definition(url)
        upgrade(url)
        assert stored() == data
        assert "pending_since IS NOT NULL" in _index_definition(url)
        if backend == "postgres":
            assert asyncio.run(_query(url, column_type)) == [("json",)]
        command.downgrade(alembic_config(url), "0007")
        assert stored() == data
        assert "WHERE" not in _index_definition(url)
        if backend == "postgres":
            assert asyncio.run(_query(url, column_type)) == [("jsonb",)]
    finally:
        drop()


_CLAIM = (
    "INSERT INTO idempotency_keys (merchant_id, livemode, key, fingerprint, method, path, created, locked_at) "
    "VALUES ('acct_1', false, :key, :fingerprint, 'POST', '/v1/payment_intents', CURRENT_TIMESTAMP, "
    "CURRENT_TIMESTAMP)"
)
_STORE = (
    "UPDATE idempotency_keys SET locked_at = NULL, resource_id = :resource, response_status = 200, "
    "response_body = :body WHERE merchant_id = 'acct_1' AND livemode = false AND key = :key"
)


async def _claim_and_answer(url: str, batch: str, count: int) -> tuple[int, int]:
    """`count` keys claimed, then each answered (a ~700-byte response) in its own transaction, as
    requests do; the table's (updates, heap-only updates) meanwhile, from its statistics."""
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    counters = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'idempotency_keys'"
    body = json.dumps({"id": "pi_1", "object": "payment_intent", "padding": "x" * 640}).encode()
    try:
        async with engine.connect() as conn:

            async def read() -> tuple[int, int]:
                await conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
                await conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
                upd, hot = (await conn.execute(sa.text(counters))).one()
                return int(upd), int(hot)

            before = await read()
            keys = [f"{batch}-{n:04d}-retry-safe-key" for n in range(count)]
            for key in keys:
                await conn.execute(sa.text(_CLAIM), {"key": key, "fingerprint": bytes(32)})
            for key in keys:
                await conn.execute(sa.text(_STORE), {"key": key, "resource": "pi_1", "body": body})
            after = await read()
            return after[0] - before[0], after[1] - before[1]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("backend", DATABASES)
def test_0010_answers_to_idempotency_keys_are_heap_only_updates_on_postgres(backend: str, tmp_path: Path) -> None:
    """Storing a key's response grows its row from ~150 bytes to ~1 KB. On full pages (before
    0010) PostgreSQL moved most rows to another page and indexed them again; from 0010 pages are
    filled to 15% at insert and every answer fits beside its row (a HOT update). SQLite has no
    fillfactor: there 0010 changes nothing and keys still claim and answer."""
    url, drop = _fresh(backend, tmp_path)
    reloptions = "SELECT reloptions FROM pg_class WHERE relname = 'idempotency_keys'"
    stored = "SELECT count(*) FROM idempotency_keys WHERE response_status = 200 AND locked_at IS NULL"
    try:
        upgrade(url, "0009")
        if backend == "postgres":
            updated, hot = asyncio.run(_claim_and_answer(url, "before", 300))
            assert updated == 300 and hot < 100
        upgrade(url, "0010")  # 0011 replaces the key column these statements write
        if backend == "postgres":
            assert asyncio.run(_query(url, reloptions)) == [(["fillfactor=15"],)]
            assert asyncio.run(_claim_and_answer(url, "after", 300)) == (300, 300)
            command.downgrade(alembic_config(url), "0009")
            assert asyncio.run(_query(url, reloptions)) == [(None,)]
        else:
            asyncio.run(_claim_and_answer_sqlite(url, 20))
            command.downgrade(alembic_config(url), "0009")
        assert asyncio.run(_query(url, stored)) == [(600 if backend == "postgres" else 20,)]
    finally:
        drop()


async def _claim_and_answer_sqlite(url: str, count: int) -> None:
    for n in range(count):
        await _query(url, _CLAIM, key=f"k{n}", fingerprint=bytes(32))
        await _query(url, _STORE, key=f"k{n}", resource="pi_1", body=b'{"id": "pi_1"}')
