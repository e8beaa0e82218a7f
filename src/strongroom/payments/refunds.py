"""Refunds: never more than was captured, never twice.

The sum check and the pending refund's insert happen under the intent's row lock (PostgreSQL
`SELECT … FOR UPDATE`; SQLite's single writer), so concurrent refunds cannot together exceed the
captured amount. The processor key is the refund's own id.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.connectors.base import ProcessorError, ProcessorResult, ProcessorTimeout, RefundRequest
from strongroom.errors import InvalidRequest
from strongroom.events import service as events
from strongroom.idempotency.service import Recorder
from strongroom.ids import new_id
from strongroom.ledger import service as ledger
from strongroom.money import format_minor, get_currency, parse_nonnegative_amount
from strongroom.payments import charges, customers, processing, views
from strongroom.payments.context import PaymentsContext, load, owned
from strongroom.payments.models import Operation, check_allowed
from strongroom.payments.params import RefundCreate, RefundList, RefundUpdate
from strongroom.payments.tables import payment_intents, refunds
from strongroom.store.db import utcnow
from strongroom.store.paging import Page, PageRequest, fetch_page

_COUNTED = ("pending", "succeeded")


async def create(ctx: PaymentsContext, principal: Principal, p: RefundCreate, rec: Recorder) -> RowMapping:
    if rec.resume_id is not None:
        return await drive(ctx, principal, rec.resume_id, rec)
    if (p.payment_intent is None) == (p.charge is None):
        raise InvalidRequest(
            "You must pass exactly one of `payment_intent` or `charge`.",
            param="payment_intent" if p.payment_intent is None else "charge",
            code="parameter_missing" if p.payment_intent is None else "parameter_invalid",
        )
    async with ctx.db.tx() as conn:
        intent, charge = await _locked_payment(conn, principal, p)
        currency = get_currency(charge["currency"])
        available = charge["amount_captured"] - await _refunded(conn, principal, charge["id"])
        if available <= 0:
            raise InvalidRequest(f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded")
        amount = available
        if p.amount is not None:
            amount = parse_nonnegative_amount(p.amount, currency, param="amount")
        if amount > available:
            raise InvalidRequest(
                f"Refund amount ({format_minor(amount, currency)} {currency.code}) is greater than unrefunded "
                f"amount on charge ({format_minor(available, currency)} {currency.code})",
                param="amount",
                code="amount_too_large",
            )
        refund_id = new_id("refund")
        await conn.execute(
            refunds.insert().values(
                merchant_id=principal.merchant_id,
                id=refund_id,
                livemode=principal.livemode,
                created=utcnow(),
                charge_id=charge["id"],
                payment_intent_id=intent["id"],
                amount=amount,
                currency=currency.code,
                status="pending",
                reason=p.reason,
                metadata=dict(p.metadata),
                processor_key=refund_id,
                pending_since=utcnow(),
            )
        )
        await rec.checkpoint(conn, refund_id)
    return await drive(ctx, principal, refund_id, rec)


async def _locked_payment(
    conn: AsyncConnection, principal: Principal, p: RefundCreate
) -> tuple[RowMapping, RowMapping]:
    if p.charge is not None:
        charge = await charges.retrieve(conn, principal, p.charge, param="charge")
        intent_id, param = charge["payment_intent_id"], "charge"
    else:
        intent_id, param = str(p.payment_intent), "payment_intent"
    intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", param=param, for_update=True)
    check_allowed(Operation.REFUND, intent["status"], intent_id)
    if p.charge is not None and p.charge != intent["latest_charge_id"]:
        # An earlier, failed attempt's charge moved no money: refunding it must not refund the
        # intent's successful charge instead.
        raise InvalidRequest(
            f"Charge {p.charge} has failed and cannot be refunded.", param="charge", code="charge_not_refundable"
        )
    charge = await charges.retrieve(conn, principal, intent["latest_charge_id"], param=param)
    return intent, charge


async def _refunded(conn: AsyncConnection, principal: Principal, charge_id: str) -> int:
    total = await conn.scalar(
        sa.select(sa.func.coalesce(sa.func.sum(refunds.c.amount), 0)).where(
            *owned(refunds, principal), refunds.c.charge_id == charge_id, refunds.c.status.in_(_COUNTED)
        )
    )
    return int(total or 0)


async def drive(ctx: PaymentsContext, principal: Principal, refund_id: str, rec: Recorder) -> RowMapping:
    """Sends a pending refund to the processor (again, with the same key, when resuming)."""
    async with ctx.db.read() as conn:
        refund = await load(conn, refunds, principal, refund_id, "refund")
        charge = await charges.retrieve(conn, principal, refund["charge_id"])
    outcome: ProcessorResult | ProcessorError | None = None
    if refund["status"] == "pending":
        connector = ctx.router.for_mode(principal.livemode)
        request = RefundRequest(refund["processor_key"], charge["processor_ref"], refund["amount"], refund["currency"])
        outcome = await processing.call(ctx.settings, "refund", lambda: connector.refund(request))
    async with ctx.db.tx() as conn:
        await load(conn, payment_intents, principal, refund["payment_intent_id"], "payment_intent", for_update=True)
        refund = await load(conn, refunds, principal, refund_id, "refund")
        if refund["status"] == "pending" and outcome is not None and not isinstance(outcome, ProcessorTimeout):
            refund = await _settled(conn, principal, refund, outcome)
        await rec.finish(conn, refund)
    return refund


async def _settled(
    conn: AsyncConnection, principal: Principal, refund: RowMapping, outcome: ProcessorResult | ProcessorError
) -> RowMapping:
    where = [*owned(refunds, principal), refunds.c.id == refund["id"]]
    if isinstance(outcome, ProcessorError):
        await conn.execute(
            refunds.update().where(*where).values(status="failed", failure_reason="unknown", pending_since=None)
        )
        refund = await load(conn, refunds, principal, refund["id"], "refund")
        await events.record(conn, principal, "refund.failed", views.refund(refund))
        return refund
    await conn.execute(
        refunds.update()
        .where(*where)
        .values(status="succeeded", processor_ref=outcome.processor_ref, pending_since=None)
    )
    charge = await charges.retrieve(conn, principal, refund["charge_id"])
    await ledger.post_refund(conn, principal, refund, charge["connector"])
    refunded = charge["amount_refunded"] + refund["amount"]
    await charges.update(
        conn, principal, charge["id"], amount_refunded=refunded, refunded=refunded >= charge["amount_captured"]
    )
    refund = await load(conn, refunds, principal, refund["id"], "refund")
    await events.record(conn, principal, "refund.created", views.refund(refund))
    charge_view = await charges.render(conn, principal, await charges.retrieve(conn, principal, charge["id"]))
    await events.record(conn, principal, "charge.refunded", charge_view)
    return refund


async def retrieve(conn: AsyncConnection, principal: Principal, refund_id: str) -> RowMapping:
    return await load(conn, refunds, principal, refund_id, "refund")


async def update(
    conn: AsyncConnection, principal: Principal, refund_id: str, p: RefundUpdate, rec: Recorder
) -> RowMapping:
    refund = await retrieve(conn, principal, refund_id)
    if p.metadata is not None:
        merged = customers.merge_metadata(refund["metadata"], dict(p.metadata))
        where = [*owned(refunds, principal), refunds.c.id == refund_id]
        await conn.execute(refunds.update().where(*where).values(metadata=merged))
        refund = await retrieve(conn, principal, refund_id)
    await rec.finish(conn, refund)
    return refund


async def list_refunds(conn: AsyncConnection, principal: Principal, p: RefundList) -> Page:
    scope = owned(refunds, principal)
    if p.payment_intent is not None:
        scope.append(refunds.c.payment_intent_id == p.payment_intent)
    if p.charge is not None:
        scope.append(refunds.c.charge_id == p.charge)
    return await fetch_page(conn, refunds, scope, PageRequest(p.limit, p.starting_after, p.ending_before))
