"""Keyset pagination with Stripe's contract: newest first, `limit`, `starting_after`, `ending_before`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.errors import InvalidRequest


@dataclass(frozen=True)
class PageRequest:
    limit: int = 10
    starting_after: str | None = None
    ending_before: str | None = None


@dataclass(frozen=True)
class Page:
    rows: Sequence[RowMapping]
    has_more: bool


async def fetch_page(
    conn: AsyncConnection,
    table: sa.Table,
    scope: Sequence[sa.ColumnElement[bool]],
    page: PageRequest,
) -> Page:
    """`scope` must include the merchant and mode filters; the cursor object must match it too."""
    if page.starting_after and page.ending_before:
        # Together they would describe no page (the query would run in one direction from one cursor).
        raise InvalidRequest(
            "You may only specify one of these parameters: ending_before, starting_after.", param="ending_before"
        )
    order_key = sa.tuple_(table.c.created, table.c.id)
    query = sa.select(table).where(*scope)
    cursor_id = page.starting_after or page.ending_before
    if cursor_id is not None:
        param = "starting_after" if page.starting_after else "ending_before"
        cursor = (
            await conn.execute(sa.select(table.c.created, table.c.id).where(*scope, table.c.id == cursor_id))
        ).first()
        if cursor is None:
            raise InvalidRequest(
                f"Invalid {param}: no object with id '{cursor_id}' in this list.",
                param=param,
                code="resource_missing",
            )
        bound = sa.tuple_(sa.literal(cursor.created), sa.literal(cursor.id))
        query = query.where(order_key < bound if page.starting_after else order_key > bound)
    if page.ending_before:
        query = query.order_by(table.c.created.asc(), table.c.id.asc())
    else:
        query = query.order_by(table.c.created.desc(), table.c.id.desc())
    rows = list((await conn.execute(query.limit(page.limit + 1))).mappings())
    has_more = len(rows) > page.limit
    rows = rows[: page.limit]
    if page.ending_before:
        rows.reverse()
    return Page(rows=rows, has_more=has_more)
