"""Capture and cancel (void) of authorized intents, 3-D Secure completion, and resuming any
processor operation whose request died. Same three phases as `authorize.py`; the processor keys
are `<intent id>:capture` and `<intent id>:void` (an intent is captured or voided at most once).
"""

from __future__ import annotations

import hmac
from typing import Any

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.connectors.base import (
    CaptureRequest,
    ProcessorError,
    ProcessorResult,
    ProcessorTimeout,
    VoidRequest,
)
from strongroom.errors import CardError, InvalidRequest, ObjectLocked, ProcessorFailure, ResourceMissing
from strongroom.events import service as events
from strongroom.idempotency.service import NULL_RECORDER, Recorder
from strongroom.ledger import service as ledger
from strongroom.money import format_minor, get_currency, parse_nonnegative_amount
from strongroom.payments import authorize, charges, processing, views
from strongroom.payments.authorize import Attempt, Finished, set_intent
from strongroom.payments.context import PaymentsContext, load
from strongroom.payments.models import IntentStatus, Operation, check_allowed
from strongroom.payments.params import IntentCancel, IntentCapture
from strongroom.payments.tables import payment_intents, payment_methods
from strongroom.payments.views import Row
from strongroom.store.db import utcnow

S = IntentStatus
_CLEARED: dict[str, Any] = {"pending_op": None, "pending_key": None, "pending_amount": None, "pending_since": None}


def _busy(intent: RowMapping) -> ObjectLocked:
    return ObjectLocked(
        f"This PaymentIntent ({intent['id']}) is being modified by another request. Retry shortly.",
    )


async def capture(
    ctx: PaymentsContext, principal: Principal, intent_id: str, p: IntentCapture, rec: Recorder
) -> Finished:
    if rec.resume_id == intent_id:
        return await resume(ctx, principal, intent_id, rec)
    async with ctx.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", for_update=True)
        # Status first: a pending authorization (status processing) is never a capture's to finish.
        check_allowed(Operation.CAPTURE, intent["status"], intent_id)
        pending = await _pending(conn, ctx, intent, rec, "capture")
        if pending is None:
            await _begin_capture(conn, principal, intent, p, rec)
    if pending == "own":
        return await resume(ctx, principal, intent_id, rec)
    if pending == "other":
        # A dead request's void comes first; this capture is then judged on its outcome.
        await resume(ctx, principal, intent_id, NULL_RECORDER)
        return await capture(ctx, principal, intent_id, p, rec)
    return await drive(ctx, principal, intent_id, rec)


async def _begin_capture(
    conn: AsyncConnection, principal: Principal, intent: RowMapping, p: IntentCapture, rec: Recorder
) -> None:
    check_allowed(Operation.CAPTURE, intent["status"], intent["id"])
    currency = get_currency(intent["currency"])
    amount = intent["amount_capturable"]
    if p.amount_to_capture is not None:
        amount = parse_nonnegative_amount(p.amount_to_capture, currency, param="amount_to_capture")
        if amount > intent["amount_capturable"]:
            raise InvalidRequest(
                f"The amount to capture ({format_minor(amount, currency)} {currency.code}) is greater than "
                f"the amount capturable ({format_minor(intent['amount_capturable'], currency)}).",
                param="amount_to_capture",
                code="amount_too_large",
            )
    await _begin(conn, principal, intent, "capture", amount, rec)


async def cancel(
    ctx: PaymentsContext, principal: Principal, intent_id: str, p: IntentCancel, rec: Recorder
) -> Finished:
    if rec.resume_id == intent_id:
        return await resume(ctx, principal, intent_id, rec)
    async with ctx.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", for_update=True)
        check_allowed(Operation.CANCEL, intent["status"], intent_id)
        pending = await _pending(conn, ctx, intent, rec, "void")
        if pending is None:
            if intent["status"] != S.REQUIRES_CAPTURE:
                intent = await _canceled(conn, principal, intent, p.cancellation_reason)
                await rec.finish(conn, intent)
                return Finished(intent, None)
            await set_intent(conn, principal, intent_id, cancellation_reason=p.cancellation_reason)
            await _begin(conn, principal, intent, "void", intent["amount_capturable"], rec)
    if pending == "own":
        return await resume(ctx, principal, intent_id, rec)
    if pending == "other":
        # A dead request's capture comes first; this cancel is then judged on its outcome.
        await resume(ctx, principal, intent_id, NULL_RECORDER)
        return await cancel(ctx, principal, intent_id, p, rec)
    return await drive(ctx, principal, intent_id, rec)


async def _begin(
    conn: AsyncConnection, principal: Principal, intent: RowMapping, op: str, amount: int, rec: Recorder
) -> None:
    await set_intent(
        conn,
        principal,
        intent["id"],
        pending_op=op,
        pending_key=f"{intent['id']}:{op}",
        pending_amount=amount,
        pending_since=utcnow(),
    )
    await rec.checkpoint(conn, intent["id"])


async def _canceled(conn: AsyncConnection, principal: Principal, intent: RowMapping, reason: str | None) -> RowMapping:
    intent = await set_intent(
        conn,
        principal,
        intent["id"],
        status=S.CANCELED,
        canceled_at=utcnow(),
        cancellation_reason=reason if reason is not None else intent["cancellation_reason"],
        amount_capturable=0,
        next_action=None,
        authentication_token=None,
        **_CLEARED,
    )
    await events.record(conn, principal, "payment_intent.canceled", views.payment_intent(intent))
    return intent


async def drive(ctx: PaymentsContext, principal: Principal, intent_id: str, rec: Recorder) -> Finished:
    """Sends the intent's pending capture or void to the processor and records the outcome."""
    async with ctx.db.read() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent")
    op, key = intent["pending_op"], intent["pending_key"]
    connector = ctx.router.for_mode(principal.livemode)
    outcome: ProcessorResult | ProcessorError
    if op == "capture":
        request = CaptureRequest(key, intent["processor_ref"], intent["pending_amount"], intent["currency"])
        outcome = await processing.call(ctx.settings, op, lambda: connector.capture(request))
    else:
        void = VoidRequest(key, intent["processor_ref"])
        outcome = await processing.call(ctx.settings, op, lambda: connector.void(void))
    async with ctx.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", for_update=True)
        if intent["pending_key"] != key:
            await rec.finish(conn, intent)
            return Finished(intent, None)
        if isinstance(outcome, ProcessorError):
            if not isinstance(outcome, ProcessorTimeout):
                # Definitive refusal: nothing moved, the intent is back to where it was.
                await set_intent(conn, principal, intent_id, **_CLEARED)
            failure = outcome
        else:
            intent = await (_captured if op == "capture" else _voided)(conn, principal, intent)
            await rec.finish(conn, intent)
            return Finished(intent, None)
    raise ProcessorFailure(f"The processor could not {op} this payment: {failure.message}. Retry shortly.")


async def _captured(conn: AsyncConnection, principal: Principal, intent: RowMapping) -> RowMapping:
    amount = intent["pending_amount"]
    await charges.update(conn, principal, intent["latest_charge_id"], captured=True, amount_captured=amount)
    await ledger.post_capture(conn, principal, intent, intent["latest_charge_id"], amount)
    intent = await set_intent(
        conn, principal, intent["id"], status=S.SUCCEEDED, amount_received=amount, amount_capturable=0, **_CLEARED
    )
    charge = await charges.render(conn, principal, await charges.retrieve(conn, principal, intent["latest_charge_id"]))
    await events.record(conn, principal, "charge.captured", charge)
    await events.record(conn, principal, "payment_intent.succeeded", views.payment_intent(intent))
    return intent


async def _voided(conn: AsyncConnection, principal: Principal, intent: RowMapping) -> RowMapping:
    # Stripe: cancelling an uncaptured payment refunds its charge in full.
    await charges.update(
        conn, principal, intent["latest_charge_id"], refunded=True, amount_refunded=intent["pending_amount"]
    )
    intent = await _canceled(conn, principal, intent, None)
    charge = await charges.render(conn, principal, await charges.retrieve(conn, principal, intent["latest_charge_id"]))
    await events.record(conn, principal, "charge.refunded", charge)
    return intent


async def _pending(
    conn: AsyncConnection, ctx: PaymentsContext, intent: RowMapping, rec: Recorder, op: str
) -> str | None:
    """None when nothing is pending. Otherwise the pending operation's request died (else: 409):
    "own" when it is the same operation (this request takes it over and resumes it), "other"
    when it is another one (the caller finishes it first, then decides afresh)."""
    if intent["pending_op"] is None:
        return None
    if not authorize.is_stale(intent, ctx.lock_timeout_s):
        raise _busy(intent)
    if intent["pending_op"] != op:
        return "other"
    await rec.checkpoint(conn, intent["id"])
    return "own"


async def resume(ctx: PaymentsContext, principal: Principal, intent_id: str, rec: Recorder) -> Finished:
    """Finishes whatever processor operation the intent has pending, with its original key."""
    async with ctx.db.read() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent")
    if intent["pending_op"] == "authorize":
        return await authorize.drive(ctx, principal, Attempt(intent_id, intent["pending_key"]), rec)
    if intent["pending_op"] in ("capture", "void"):
        return await drive(ctx, principal, intent_id, rec)
    async with ctx.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent")
        # The operation was settled meanwhile (by the recovery sweep). If it was this request's
        # authorization and it failed, the retry answers the decline the first response would
        # have been, not a 200.
        error = _recorded_decline(intent)
        await rec.finish(conn, error if error is not None else intent)
    return Finished(intent, error)


def _recorded_decline(intent: RowMapping) -> CardError | None:
    failure = intent["last_payment_error"]
    if intent["status"] != S.REQUIRES_PAYMENT_METHOD or not failure or failure.get("type") != "card_error":
        return None
    error = CardError(failure["message"], code=failure.get("code"), decline_code=failure.get("decline_code"))
    error.extra.update({"charge": failure.get("charge"), "payment_intent": views.payment_intent(intent)})
    return error


async def authenticate(ctx: PaymentsContext, merchant_id: str, intent_id: str, token: str, succeeded: bool) -> Row:
    """The customer's 3-D Secure result (sandbox): on success the same intent is authorized again
    with the authentication attached; on failure it goes back to requires_payment_method."""
    principal = Principal(merchant_id=merchant_id, livemode=False, key_id="3ds")
    async with ctx.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", for_update=True)
        expected = intent["authentication_token"]
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, so a 500).
        given = token.encode("utf-8", "surrogatepass")
        if (
            intent["status"] != S.REQUIRES_ACTION
            or expected is None
            or not hmac.compare_digest(expected.encode(), given)
        ):
            raise ResourceMissing("payment_intent", intent_id)
        if succeeded:
            pm = await load(conn, payment_methods, principal, intent["payment_method_id"], "payment_method")
            attempt = await authorize.begin(conn, principal, intent, pm, NULL_RECORDER, authenticated=True)
        else:
            intent = await set_intent(
                conn,
                principal,
                intent_id,
                status=S.REQUIRES_PAYMENT_METHOD,
                payment_method_id=None,
                next_action=None,
                authentication_token=None,
                last_payment_error={
                    "type": "card_error",
                    "code": "payment_intent_authentication_failure",
                    "message": "The provided payment method has failed authentication.",
                },
            )
            await events.record(conn, principal, "payment_intent.payment_failed", views.payment_intent(intent))
            return intent
    return (await authorize.drive(ctx, principal, attempt, NULL_RECORDER)).intent
