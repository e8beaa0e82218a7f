"""Shared fixtures of the idempotency suite (SECURITY.md rows I1 to I4)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa

from strongroom.api.http import Services

CountRows = Callable[[sa.Table, str], Awaitable[int]]


@pytest.fixture
def count_rows(services: Services) -> CountRows:
    """`await count_rows(table, merchant_id)`: the merchant's rows in one of the app's tables."""

    async def count(table: sa.Table, merchant_id: str) -> int:
        query = sa.select(sa.func.count()).select_from(table).where(table.c.merchant_id == merchant_id)
        async with services.db.read() as conn:
            return int((await conn.execute(query)).scalar_one())

    return count
