"""`Database.fetch_one` and `execute_one`: one statement on its own (autocommitted), on SQLite
through SQLAlchemy and on PostgreSQL through store.pg; both give what SQLAlchemy would."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from strongroom.events.tables import events
from strongroom.store.db import Database, as_utc, insert_ignore


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


def _event(merchant_id: str, event_id: str) -> dict[str, object]:
    return {
        "merchant_id": merchant_id,
        "id": event_id,
        "livemode": False,
        "created": dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC),
        "type": "test.single",
        "object_id": "obj_1",
        "data": {"object": {"amount": 2000, "name": "Zoë"}},
    }


_BY_ID = sa.select(events).where(events.c.merchant_id == sa.bindparam("m"), events.c.id == sa.bindparam("i"))


async def test_execute_one_reports_the_rows_it_wrote_and_fetch_one_reads_them_back(db: Database) -> None:
    merchant = "acct_" + secrets.token_hex(6)
    insert = insert_ignore(db.dialect, events)

    assert await db.execute_one(insert, _event(merchant, "evt_1")) == 1
    assert await db.execute_one(insert, _event(merchant, "evt_1")) == 0  # already there: ignored

    row = await db.fetch_one(_BY_ID, {"m": merchant, "i": "evt_1"})
    assert row is not None
    assert row["data"] == {"object": {"amount": 2000, "name": "Zoë"}}
    assert as_utc(row["created"]) == dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    assert row["livemode"] is False


async def test_fetch_one_of_a_missing_row_is_none(db: Database) -> None:
    assert await db.fetch_one(_BY_ID, {"m": "acct_nobody", "i": "evt_none"}) is None
