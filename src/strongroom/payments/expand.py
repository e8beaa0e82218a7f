"""Stripe's `expand[]`: replace an id in a response with the object it names."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.errors import InvalidRequest, ResourceMissing
from strongroom.payments import charges, customers, intents, methods, views

EXPANDABLE = {
    "payment_intent": frozenset({"latest_charge", "customer", "payment_method"}),
    "refund": frozenset({"charge", "payment_intent"}),
    "charge": frozenset({"payment_intent", "customer", "payment_method"}),
    "payment_method": frozenset({"customer"}),
}


def check(kind: str, expand: list[str], *, in_list: bool = False) -> list[str]:
    fields = []
    for path in expand:
        field = path.removeprefix("data.") if in_list else path
        if field not in EXPANDABLE.get(kind, frozenset()):
            raise InvalidRequest(f"This property cannot be expanded ({path}).", param="expand")
        fields.append(field)
    return fields


async def apply(conn: AsyncConnection, principal: Principal, obj: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    for field in fields:
        value = obj.get(field)
        if not isinstance(value, str):
            continue
        try:
            obj[field] = await _load(conn, principal, field, value)
        except ResourceMissing:
            obj[field] = None
    return obj


async def _load(conn: AsyncConnection, principal: Principal, field: str, object_id: str) -> dict[str, Any]:
    if field in ("latest_charge", "charge"):
        return await charges.render(conn, principal, await charges.retrieve(conn, principal, object_id))
    if field == "customer":
        return views.customer(await customers.retrieve(conn, principal, object_id))
    if field == "payment_method":
        return views.payment_method(await methods.retrieve(conn, principal, object_id))
    return views.payment_intent(await intents.retrieve(conn, principal, object_id))
