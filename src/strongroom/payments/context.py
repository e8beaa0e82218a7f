"""What the payments services need, built once at start-up and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.connectors.routing import Router
from strongroom.errors import ResourceMissing
from strongroom.settings import PaymentsSettings
from strongroom.store.db import Database
from strongroom.vault.service import Vault


@dataclass(frozen=True)
class PaymentsContext:
    db: Database
    vault: Vault
    router: Router
    settings: PaymentsSettings
    lock_timeout_s: float
    public_url: str


def owned(table: sa.Table, principal: Principal) -> list[sa.ColumnElement[bool]]:
    return [table.c.merchant_id == principal.merchant_id, table.c.livemode == principal.livemode]


async def load(
    conn: AsyncConnection,
    table: sa.Table,
    principal: Principal,
    object_id: str,
    kind: str,
    *,
    param: str | None = "id",
    for_update: bool = False,
) -> RowMapping:
    """The merchant's object by id; another merchant's (or mode's) id is indistinguishable from none."""
    query = sa.select(table).where(*owned(table, principal), table.c.id == object_id)
    if for_update and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = (await conn.execute(query)).mappings().first()
    if row is None:
        raise ResourceMissing(kind, object_id, param=param)
    return row


async def update_owned(
    conn: AsyncConnection, table: sa.Table, principal: Principal, object_id: str, kind: str, **values: object
) -> RowMapping:
    """UPDATE … RETURNING: the changed row in the same round trip (PostgreSQL and SQLite ≥ 3.35)."""
    where = [*owned(table, principal), table.c.id == object_id]
    row = (await conn.execute(table.update().where(*where).values(**values).returning(*table.c))).mappings().first()
    if row is None:
        raise ResourceMissing(kind, object_id)
    return row
