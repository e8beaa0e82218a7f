"""Charges: one per authorization attempt that reached a processor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.ids import new_id
from strongroom.payments import views
from strongroom.payments.context import load, owned
from strongroom.payments.params import ChargeList
from strongroom.payments.tables import charges, payment_methods
from strongroom.store.db import utcnow
from strongroom.store.group import Write
from strongroom.store.paging import Page, PageRequest, fetch_page

_INSERT = charges.insert().returning(*charges.c)
_INSERT_PLAIN = charges.insert()
# Every column, as RETURNING would give it: a row built here renders like one read back.
_EMPTY: dict[str, Any] = {c.name: None for c in charges.c}


def new_row(principal: Principal, intent: Mapping[Any, Any], **values: Any) -> dict[str, Any]:
    """The charge of `intent` with `values`, every column present (nothing written yet)."""
    return _EMPTY | {
        "merchant_id": principal.merchant_id,
        "id": new_id("charge"),
        "livemode": principal.livemode,
        "created": utcnow(),
        "payment_intent_id": intent["id"],
        "payment_method_id": intent["payment_method_id"],
        "customer_id": intent["customer_id"],
        "amount": intent["amount"],
        "currency": intent["currency"],
        "connector": intent["connector"],
        "amount_refunded": 0,
        "refunded": False,
        **values,
    }


def insert_write(row: dict[str, Any]) -> Write:
    return Write(_INSERT_PLAIN, row)


async def insert(conn: AsyncConnection, principal: Principal, intent: RowMapping, **values: Any) -> RowMapping:
    inserted = await conn.execute(_INSERT, new_row(principal, intent, **values))
    return inserted.mappings().one()


async def retrieve(conn: AsyncConnection, principal: Principal, charge_id: str, *, param: str = "id") -> RowMapping:
    return await load(conn, charges, principal, charge_id, "charge", param=param)


async def update(conn: AsyncConnection, principal: Principal, charge_id: str, **values: Any) -> None:
    await conn.execute(charges.update().where(*owned(charges, principal), charges.c.id == charge_id).values(**values))


async def render(conn: AsyncConnection, principal: Principal, row: RowMapping) -> dict[str, Any]:
    card = (
        (
            await conn.execute(
                sa.select(payment_methods).where(
                    *owned(payment_methods, principal), payment_methods.c.id == row["payment_method_id"]
                )
            )
        )
        .mappings()
        .first()
    )
    return views.charge(row, card)


async def list_charges(conn: AsyncConnection, principal: Principal, p: ChargeList) -> Page:
    scope = owned(charges, principal)
    if p.payment_intent is not None:
        scope.append(charges.c.payment_intent_id == p.payment_intent)
    if p.customer is not None:
        scope.append(charges.c.customer_id == p.customer)
    return await fetch_page(conn, charges, scope, PageRequest(p.limit, p.starting_after, p.ending_before))
