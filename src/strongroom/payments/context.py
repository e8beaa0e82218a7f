"""What the payments services need, built once at start-up and passed down."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.connectors.routing import Router
from strongroom.errors import ResourceMissing
from strongroom.settings import PaymentsSettings
from strongroom.store.db import Database
from strongroom.store.group import GroupCommit, Write
from strongroom.vault.interface import CardVault


@dataclass(frozen=True)
class PaymentsContext:
    db: Database
    vault: CardVault
    router: Router
    settings: PaymentsSettings
    lock_timeout_s: float
    public_url: str
    # The final writes of concurrent payments, committed together (store.group).
    commits: GroupCommit


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
    query = _select_one(table, for_update and conn.dialect.name == "postgresql")
    row: RowMapping | None = (await conn.execute(query, _key(principal, object_id))).mappings().first()
    if row is None:
        raise ResourceMissing(kind, object_id, param=param)
    return row


async def update_owned(
    conn: AsyncConnection, table: sa.Table, principal: Principal, object_id: str, kind: str, **values: object
) -> RowMapping:
    """UPDATE … RETURNING: the changed row in the same round trip (PostgreSQL and SQLite ≥ 3.35)."""
    # The SET clause comes from the parameter names: one statement object per table, built once.
    row = (await conn.execute(_update_one(table), {**values, **_key(principal, object_id)})).mappings().first()
    if row is None:
        raise ResourceMissing(kind, object_id)
    return row


async def load_one(
    db: Database, table: sa.Table, principal: Principal, object_id: str, kind: str, *, param: str | None = "id"
) -> dict[str, Any]:
    """`load` as one statement on its own, for a read that needs no transaction around it."""
    row = await db.fetch_one(_select_one(table, False), _key(principal, object_id))
    if row is None:
        raise ResourceMissing(kind, object_id, param=param)
    return row


def update_write(table: sa.Table, principal: Principal, object_id: str, values: dict[str, Any]) -> Write:
    """`update_owned` without RETURNING, for a caller that writes it with others (store.group)."""
    return Write(_update_plain(table), {**values, **_key(principal, object_id)})


def _key(principal: Principal, object_id: str) -> dict[str, object]:
    return {"w_merchant_id": principal.merchant_id, "w_livemode": principal.livemode, "w_id": object_id}


def _where(table: sa.Table) -> list[sa.ColumnElement[bool]]:
    return [
        table.c.merchant_id == sa.bindparam("w_merchant_id"),
        table.c.livemode == sa.bindparam("w_livemode"),
        table.c.id == sa.bindparam("w_id"),
    ]


# Statements built once per table: constructing and cache-keying a statement per call was the
# largest CPU cost of a payment (profile in the benchmark notes).
@functools.cache
def _select_one(table: sa.Table, for_update: bool) -> sa.Select[Any]:
    query = sa.select(table).where(*_where(table))
    return query.with_for_update() if for_update else query


@functools.cache
def _update_one(table: sa.Table) -> sa.Update:
    return table.update().where(*_where(table)).returning(*table.c)


@functools.cache
def _update_plain(table: sa.Table) -> sa.Update:
    return table.update().where(*_where(table))
