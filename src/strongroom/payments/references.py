"""Finding our charges and refunds by the processor's references (for reconciliation).

A settlement report names the processor's ids; these functions map them back to the merchant,
mode and our id, across all merchants: reconciliation is a platform job, not a merchant request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.payments.tables import charges, refunds

_CHUNK = 500


@dataclass(frozen=True)
class Owned:
    merchant_id: str
    livemode: bool
    id: str


async def charges_by_processor_ref(conn: AsyncConnection, connector: str, refs: Iterable[str]) -> dict[str, Owned]:
    c = charges.c
    found: dict[str, Owned] = {}
    for chunk in _chunks(refs):
        query = sa.select(c.processor_ref, c.merchant_id, c.livemode, c.id).where(
            c.connector == connector, c.processor_ref.in_(chunk)
        )
        for ref, merchant_id, livemode, charge_id in await conn.execute(query):
            found[ref] = Owned(merchant_id, bool(livemode), charge_id)
    return found


async def refunds_by_processor_ref(conn: AsyncConnection, connector: str, refs: Iterable[str]) -> dict[str, Owned]:
    r, c = refunds.c, charges.c
    found: dict[str, Owned] = {}
    for chunk in _chunks(refs):
        query = (
            sa.select(r.processor_ref, r.merchant_id, r.livemode, r.id)
            .join(charges, sa.and_(c.merchant_id == r.merchant_id, c.id == r.charge_id))
            .where(c.connector == connector, r.processor_ref.in_(chunk))
        )
        for ref, merchant_id, livemode, refund_id in await conn.execute(query):
            found[ref] = Owned(merchant_id, bool(livemode), refund_id)
    return found


def _chunks(refs: Iterable[str]) -> Iterable[list[str]]:
    items = sorted(set(refs))
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]
