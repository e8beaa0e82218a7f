"""Events: written in the same transaction as the change they describe (ARCHITECTURE: data rules)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.errors import ResourceMissing
from strongroom.events.tables import events
from strongroom.ids import new_id
from strongroom.store import group
from strongroom.store.db import epoch_s, utcnow
from strongroom.store.group import Write
from strongroom.store.paging import Page, PageRequest, fetch_page

API_VERSION = "2024-06-20"
# Built once: a constant statement compiles once and its cache key is computed once.
_INSERT = events.insert()


def record_write(principal: Principal, type_: str, obj: dict[str, Any]) -> Write:
    """The event's INSERT, for a caller that writes it with others (see store.group)."""
    return Write(
        _INSERT,
        {
            "merchant_id": principal.merchant_id,
            "id": new_id("event"),
            "livemode": principal.livemode,
            "created": utcnow(),
            "type": type_,
            "object_id": obj["id"],
            "data": {"object": obj},
        },
    )


async def record(conn: AsyncConnection, principal: Principal, type_: str, obj: dict[str, Any]) -> str:
    write = record_write(principal, type_, obj)
    await group.execute(conn, [write])
    event_id: str = write.params["id"]
    return event_id


def _scope(principal: Principal) -> list[sa.ColumnElement[bool]]:
    return [events.c.merchant_id == principal.merchant_id, events.c.livemode == principal.livemode]


async def retrieve(conn: AsyncConnection, principal: Principal, event_id: str) -> RowMapping:
    row = (await conn.execute(sa.select(events).where(*_scope(principal), events.c.id == event_id))).mappings().first()
    if row is None:
        raise ResourceMissing("event", event_id)
    return row


async def list_events(
    conn: AsyncConnection, principal: Principal, page: PageRequest, *, type_: str | None = None
) -> Page:
    scope = _scope(principal)
    if type_ is not None:
        if type_.endswith(".*"):
            scope.append(events.c.type.startswith(type_[:-1], autoescape=True))
        else:
            scope.append(events.c.type == type_)
    return await fetch_page(conn, events, scope, page)


def view(row: RowMapping) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "event",
        "api_version": API_VERSION,
        "created": epoch_s(row["created"]),
        "livemode": row["livemode"],
        "type": row["type"],
        "data": row["data"],
        "pending_webhooks": 0,
        "request": {"id": None, "idempotency_key": None},
    }
