"""Customers."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.errors import ResourceMissing
from strongroom.events import service as events
from strongroom.idempotency.service import Recorder
from strongroom.ids import new_id
from strongroom.payments import views
from strongroom.payments.context import load, owned
from strongroom.payments.params import CustomerCreate, CustomerList, CustomerUpdate
from strongroom.payments.tables import customers, payment_methods
from strongroom.store.db import utcnow
from strongroom.store.paging import Page, PageRequest, fetch_page


async def create(conn: AsyncConnection, principal: Principal, p: CustomerCreate, rec: Recorder) -> RowMapping:
    customer_id = new_id("customer")
    await conn.execute(
        customers.insert().values(
            merchant_id=principal.merchant_id,
            id=customer_id,
            livemode=principal.livemode,
            created=utcnow(),
            email=p.email,
            name=p.name,
            description=p.description,
            phone=p.phone,
            metadata=dict(p.metadata),
            deleted=False,
        )
    )
    row = await load(conn, customers, principal, customer_id, "customer")
    await events.record(conn, principal, "customer.created", views.customer(row))
    await rec.finish(conn, row)
    return row


async def retrieve(conn: AsyncConnection, principal: Principal, customer_id: str, *, param: str = "id") -> RowMapping:
    return await load(conn, customers, principal, customer_id, "customer", param=param)


async def live(conn: AsyncConnection, principal: Principal, customer_id: str, *, param: str = "customer") -> RowMapping:
    """A customer that exists and is not deleted (for references from other objects)."""
    row = await load(conn, customers, principal, customer_id, "customer", param=param)
    if row["deleted"]:
        raise ResourceMissing("customer", customer_id, param=param)
    return row


def merge_metadata(current: dict[str, str], update: dict[str, str] | None) -> dict[str, str]:
    """Stripe's metadata update: keys merge, an empty value deletes a key."""
    if update is None:
        return current
    if not update:
        return {}
    merged = {**current, **update}
    return {k: v for k, v in merged.items() if v != ""}


async def update(
    conn: AsyncConnection, principal: Principal, customer_id: str, p: CustomerUpdate, rec: Recorder
) -> RowMapping:
    row = await live(conn, principal, customer_id, param="id")
    values: dict[str, Any] = {
        k: getattr(p, k) for k in ("email", "name", "description", "phone") if k in p.model_fields_set
    }
    if "metadata" in p.model_fields_set:
        values["metadata"] = merge_metadata(row["metadata"], dict(p.metadata))
    if values:
        await conn.execute(
            customers.update().where(*owned(customers, principal), customers.c.id == customer_id).values(**values)
        )
    row = await load(conn, customers, principal, customer_id, "customer")
    await events.record(conn, principal, "customer.updated", views.customer(row))
    await rec.finish(conn, row)
    return row


async def delete(conn: AsyncConnection, principal: Principal, customer_id: str, rec: Recorder) -> RowMapping:
    await live(conn, principal, customer_id, param="id")
    where = [*owned(customers, principal), customers.c.id == customer_id]
    await conn.execute(customers.update().where(*where).values(deleted=True))
    # Stripe: a deleted customer's payment methods are detached and cannot be used for them again.
    attached = [*owned(payment_methods, principal), payment_methods.c.customer_id == customer_id]
    await conn.execute(payment_methods.update().where(*attached).values(customer_id=None))
    row = await load(conn, customers, principal, customer_id, "customer")
    await events.record(conn, principal, "customer.deleted", views.customer(row))
    await rec.finish(conn, row)
    return row


async def list_customers(conn: AsyncConnection, principal: Principal, p: CustomerList) -> Page:
    scope = [*owned(customers, principal), customers.c.deleted.is_(False)]
    if p.email is not None:
        scope.append(customers.c.email == p.email)
    page = PageRequest(p.limit, p.starting_after, p.ending_before)
    return await fetch_page(conn, customers, scope, page)
