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
