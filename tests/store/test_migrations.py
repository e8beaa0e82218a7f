"""Migrations create exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import create_async_engine
from tests.conftest import PG_URL, _admin, _fresh_postgres_database

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


@pytest.mark.skipif(PG_URL is None, reason="PostgreSQL only (SQLite has one JSON type)")
def test_0008_events_written_as_jsonb_read_back_the_same_as_json_and_back() -> None:
    """Events stored before 0008 (jsonb) keep their content through the change to json and the
    downgrade; only the column's type changes."""
    assert PG_URL is not None
    name, url = _fresh_postgres_database(PG_URL)
    data = {"object": {"id": "pi_1", "object": "payment_intent", "amount": 2000, "metadata": {"k": "v"}}}
    insert = (
        "INSERT INTO events (merchant_id, id, livemode, created, type, object_id, data) "
        "VALUES ('acct_1', 'evt_1', false, now(), 'payment_intent.created', 'pi_1', CAST(:data AS jsonb))"
    )
    read = "SELECT data::text FROM events WHERE id = 'evt_1'"
    column_type = (
        "SELECT data_type FROM information_schema.columns WHERE table_name = 'events' AND column_name = 'data'"
    )
    try:
        upgrade(url, "0007")
        asyncio.run(_query(url, insert, data=json.dumps(data)))
        assert asyncio.run(_query(url, column_type)) == [("jsonb",)]
        upgrade(url)
        assert asyncio.run(_query(url, column_type)) == [("json",)]
        assert json.loads(str(asyncio.run(_query(url, read))[0][0])) == data
        command.downgrade(alembic_config(url), "0007")
        assert asyncio.run(_query(url, column_type)) == [("jsonb",)]
        assert json.loads(str(asyncio.run(_query(url, read))[0][0])) == data
    finally:
        asyncio.run(_admin(PG_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def test_the_pending_sweep_index_holds_only_pending_intents(database_url: str) -> None:
    """ix_payment_intents_pending is partial: an intent whose processor call is over (pending_since
    cleared) has no entry, so the index is the size of the work in flight."""
    if database_url.startswith("sqlite"):
        statement = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'ix_payment_intents_pending'"
    else:
        statement = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_payment_intents_pending'"
    ((definition,),) = await _query(database_url, statement)
    assert "WHERE" in str(definition) and "pending_since IS NOT NULL" in str(definition)
