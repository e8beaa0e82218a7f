"""The sandbox processor's settlement report: every capture and refund it made, with its fee.

The report is what a real processor sends for reconciliation (Stripe's itemized balance-change
format, see `strongroom.ledger.reports`), so the whole loop — pay, settle, reconcile — runs
without a network. Fees follow a published-looking schedule: 2.9 % of the gross (rounded half
up) plus 30 minor units in two-decimal currencies (scaled for three-decimal ones, none for
zero-decimal ones); refunds carry no fee, as Stripe returns none.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from strongroom.connectors.sandbox.tables import sandbox_operations
from strongroom.ledger.reports import Category, Movement
from strongroom.money import get_currency
from strongroom.store.db import Database

FEE_PERCENT_TENTHS = 29  # 2.9 %


def fee_minor(gross_minor: int, currency: str) -> int:
    exponent = get_currency(currency).exponent
    fixed = 30 * 10 ** (exponent - 2) if exponent >= 2 else 0
    return (gross_minor * FEE_PERCENT_TENTHS + 500) // 1000 + fixed


async def settlement_movements(
    db: Database,
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    available_after: dt.timedelta = dt.timedelta(0),
) -> list[Movement]:
    """Captures (including authorize-and-capture) and refunds the sandbox made in [since, until)."""
    ops = sandbox_operations.c
    where: list[sa.ColumnElement[bool]] = [
        sa.or_(
            sa.and_(ops.kind == "authorize", ops.outcome == "captured"),
            sa.and_(ops.kind.in_(("capture", "refund")), ops.outcome == "succeeded"),
        ),
        ops.amount_minor > 0,
    ]
    if since is not None:
        where.append(ops.created_at >= since)
    if until is not None:
        where.append(ops.created_at < until)
    query = sa.select(ops.kind, ops.processor_ref, ops.charge_ref, ops.currency, ops.amount_minor, ops.created_at)
    async with db.read() as conn:
        rows = (await conn.execute(query.where(*where).order_by(ops.created_at, ops.processor_ref))).all()
    return list(_movements(rows, available_after))


def _movements(rows: Iterable[Any], after: dt.timedelta) -> Iterable[Movement]:
    for kind, ref, charge_ref, currency, amount_minor, created in rows:
        refund = kind == "refund"
        yield Movement(
            processor_txn="txn_" + ref,
            category=Category.REFUND if refund else Category.CHARGE,
            source_ref=ref if refund else charge_ref,
            charge_ref=charge_ref,
            currency=currency,
            gross_minor=-amount_minor if refund else amount_minor,
            fee_minor=0 if refund else fee_minor(amount_minor, currency),
            created=created,
            available_on=created + after,
        )
