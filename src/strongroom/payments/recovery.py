"""The recovery sweep: resolves processor operations whose request died (crash, timeout).

An authorization is asked about with `fetch_status` under its original key: a result the
processor has is applied; a key the processor never saw fails the attempt (nothing was charged,
the customer can retry). Captures, voids and refunds are sent again with their original key,
which the processor deduplicates. Bounded: at most `recovery_batch` objects per sweep.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
import structlog

from strongroom.auth.models import Principal
from strongroom.connectors.base import Authorization, ProcessorError, ProcessorTimeout, ProcessorUnavailable
from strongroom.errors import StrongroomError
from strongroom.idempotency.service import NULL_RECORDER
from strongroom.payments import authorize, processing, refunds, settle
from strongroom.payments.authorize import Attempt
from strongroom.payments.context import PaymentsContext
from strongroom.payments.tables import payment_intents
from strongroom.payments.tables import refunds as refunds_table
from strongroom.store.db import utcnow

log = structlog.get_logger(__name__)


async def sweep(ctx: PaymentsContext, *, older_than_s: float | None = None) -> int:
    age_s = ctx.settings.recovery_after_s if older_than_s is None else older_than_s
    cutoff = utcnow() - dt.timedelta(seconds=age_s)
    limit = ctx.settings.recovery_batch
    async with ctx.db.read() as conn:
        stuck = (
            await conn.execute(
                sa.select(
                    payment_intents.c.merchant_id,
                    payment_intents.c.livemode,
                    payment_intents.c.id,
                    payment_intents.c.pending_op,
                    payment_intents.c.pending_key,
                )
                .where(payment_intents.c.pending_since < cutoff)
                .limit(limit)
            )
        ).all()
        pending_refunds = (
            await conn.execute(
                sa.select(refunds_table.c.merchant_id, refunds_table.c.livemode, refunds_table.c.id)
                .where(refunds_table.c.status == "pending", refunds_table.c.pending_since < cutoff)
                .limit(limit)
            )
        ).all()
    resolved = 0
    for row in stuck:
        principal = Principal(row.merchant_id, row.livemode, "recovery")
        try:
            if row.pending_op == "authorize":
                await _resolve_authorization(ctx, principal, Attempt(row.id, row.pending_key))
            else:
                await settle.drive(ctx, principal, row.id, NULL_RECORDER)
            resolved += 1
        except StrongroomError as exc:
            log.warning("recovery.unresolved", object_id=row.id, op=row.pending_op, error=exc.message)
    for refund in pending_refunds:
        principal = Principal(refund.merchant_id, refund.livemode, "recovery")
        await refunds.drive(ctx, principal, refund.id, NULL_RECORDER)
        resolved += 1
    return resolved


async def _resolve_authorization(ctx: PaymentsContext, principal: Principal, attempt: Attempt) -> None:
    connector = ctx.router.for_mode(principal.livemode)
    status = await processing.call(ctx.settings, "fetch_status", lambda: connector.fetch_status(attempt.key))
    if isinstance(status, ProcessorTimeout):
        return  # still unknown: the next sweep asks again
    outcome: Authorization | ProcessorError
    if status is None:
        outcome = ProcessorUnavailable("the processor never received this authorization", raw_code="not_found")
    else:
        outcome = status
    async with ctx.db.tx() as conn:
        await authorize.finish(conn, ctx, principal, attempt, outcome, NULL_RECORDER)
    log.info("recovery.authorization_resolved", intent=attempt.intent_id, outcome=type(outcome).__name__)
