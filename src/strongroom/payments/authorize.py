"""Authorization attempts: begin (intent → processing, in the caller's transaction), drive (the
processor call, outside any transaction), finish (the outcome, its charge and its events, and the
idempotent response, in one transaction).

The processor-side idempotency key is `<intent id>:auth:<attempt>`: deterministic, so a retry or a
recovery of the same attempt can never authorize twice.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.connectors.base import (
    Authentication,
    Authorization,
    AuthorizationStatus,
    AuthorizeRequest,
    Declined,
    ProcessorError,
    ProcessorTimeout,
)
from strongroom.errors import CardError
from strongroom.events import service as events
from strongroom.idempotency.service import Recorder
from strongroom.ledger import service as ledger
from strongroom.payments import charges, methods, processing, views
from strongroom.payments.context import PaymentsContext, load, update_owned, update_write
from strongroom.payments.models import DECLINE_MESSAGES, DECLINE_TOP_CODES, IntentStatus
from strongroom.payments.tables import payment_intents, payment_methods
from strongroom.payments.views import Row
from strongroom.store import group
from strongroom.store.db import as_utc, utcnow
from strongroom.store.group import Guard, Write

S = IntentStatus
_CLEARED: dict[str, Any] = {"pending_op": None, "pending_key": None, "pending_amount": None, "pending_since": None}


@dataclass(frozen=True)
class Attempt:
    intent_id: str
    key: str
    # Known when the attempt began in this request; loaded again when a recovery resumes it.
    intent: Row | None = None
    payment_method: Row | None = None


@dataclass(frozen=True)
class Finished:
    intent: Row
    error: CardError | None


def is_stale(intent: RowMapping, older_than_s: float) -> bool:
    since = intent["pending_since"]
    return since is not None and as_utc(since) < utcnow() - dt.timedelta(seconds=older_than_s)


async def set_intent(conn: AsyncConnection, principal: Principal, intent_id: str, **values: Any) -> RowMapping:
    values["updated"] = utcnow()
    return await update_owned(conn, payment_intents, principal, intent_id, "payment_intent", **values)


def begin_values(intent: Row, pm: Row, *, authenticated: bool = False) -> tuple[str, dict[str, Any]]:
    """The processor key of the intent's next attempt and the intent's changes that begin it."""
    attempt = intent["attempt"] + 1
    key = f"{intent['id']}:auth:{attempt}" + (":3ds" if authenticated else "")
    return key, {
        "status": S.PROCESSING,
        "payment_method_id": pm["id"],
        "attempt": attempt,
        "pending_op": "authorize",
        "pending_key": key,
        "pending_amount": intent["amount"],
        "pending_since": utcnow(),
        "last_payment_error": None,
        "next_action": None,
        "authentication_token": None,
    }


async def begin(
    conn: AsyncConnection,
    principal: Principal,
    intent: Row,
    pm: Row,
    rec: Recorder,
    *,
    authenticated: bool = False,
) -> Attempt:
    key, values = begin_values(intent, pm, authenticated=authenticated)
    updated = await set_intent(conn, principal, intent["id"], **values)
    await rec.checkpoint(conn, intent["id"])
    return Attempt(intent["id"], key, updated, pm)


async def drive(ctx: PaymentsContext, principal: Principal, attempt: Attempt, rec: Recorder) -> Finished:
    intent, pm = attempt.intent, attempt.payment_method
    if intent is None or pm is None:
        async with ctx.db.read() as conn:
            intent = await load(conn, payment_intents, principal, attempt.intent_id, "payment_intent")
            pm = await load(conn, payment_methods, principal, intent["payment_method_id"], "payment_method")
        attempt = Attempt(attempt.intent_id, attempt.key, intent, pm)
    request = AuthorizeRequest(
        idempotency_key=attempt.key,
        merchant_id=principal.merchant_id,
        amount_minor=intent["amount"],
        currency=intent["currency"],
        capture=intent["capture_method"] != "manual",
        card=methods.card_ref(pm),
        livemode=principal.livemode,
        authentication=Authentication.SUCCEEDED if attempt.key.endswith(":3ds") else None,
    )
    connector = ctx.router.for_mode(principal.livemode)
    outcome = await processing.call(ctx.settings, "authorize", lambda: connector.authorize(request))
    processing.failpoint(ctx.settings, "exit_after_processor_call")
    finished = await _finish_grouped(ctx, principal, attempt, outcome, rec)
    if finished is None:
        async with ctx.db.tx() as conn:
            finished = await finish(conn, ctx, principal, attempt, outcome, rec)
    if not isinstance(outcome, ProcessorTimeout):
        # PCI DSS 3.3.1.2: the CVC must not outlive the authorization it was collected for.
        ctx.vault.discard_cvc(principal.merchant_id, pm["vault_token"])
    return finished


async def finish(
    conn: AsyncConnection,
    ctx: PaymentsContext,
    principal: Principal,
    attempt: Attempt,
    outcome: Authorization | ProcessorError,
    rec: Recorder,
) -> Finished:
    intent = await load(conn, payment_intents, principal, attempt.intent_id, "payment_intent", for_update=True)
    if intent["pending_op"] != "authorize" or intent["pending_key"] != attempt.key:
        # Another path (the recovery sweep, a concurrent retry) already settled this attempt.
        await rec.finish(conn, intent)
        return Finished(intent, None)
    if isinstance(outcome, ProcessorTimeout):
        # Outcome unknown: the intent stays `processing` until the same key resolves it.
        await rec.finish(conn, intent)
        return Finished(intent, None)
    pm = attempt.payment_method
    if pm is None:
        pm = await load(conn, payment_methods, principal, intent["payment_method_id"], "payment_method")
    if isinstance(outcome, Authorization):
        after = await _succeed(conn, ctx, principal, intent, pm, outcome)
        await rec.finish(conn, after)
        return Finished(after, None)
    return await _fail(conn, principal, intent, pm, outcome, rec)


async def _succeed(
    conn: AsyncConnection,
    ctx: PaymentsContext,
    principal: Principal,
    intent: RowMapping,
    pm: Row,
    auth: Authorization,
) -> Row:
    if auth.status is AuthorizationStatus.REQUIRES_ACTION:
        token = secrets.token_urlsafe(32)
        url = f"{ctx.public_url}/v1/sandbox/3ds/{principal.merchant_id}/{intent['id']}?token={token}"
        intent = await set_intent(
            conn,
            principal,
            intent["id"],
            status=S.REQUIRES_ACTION,
            authentication_token=token,
            next_action={
                "type": "redirect_to_url",
                "redirect_to_url": {"url": url, "return_url": intent["return_url"]},
            },
            **_CLEARED,
        )
        await events.record(conn, principal, "payment_intent.requires_action", views.payment_intent(intent))
        return intent
    plan = _success_plan(principal, intent, pm, auth)
    await group.execute(conn, plan.writes)
    return plan.intent


@dataclass(frozen=True)
class _Plan:
    writes: list[Write]
    intent: dict[str, Any]


def _success_plan(principal: Principal, intent: Row, pm: Row, auth: Authorization) -> _Plan:
    """An authorization (captured or not) as the writes that record it: its charge, the capture's
    journal posting, the intent's new state and their events. All values are computed here, so
    the same writes serve one request's transaction and a group commit (store.group)."""
    captured = auth.status is AuthorizationStatus.CAPTURED
    charge = charges.new_row(
        principal,
        intent,
        amount_captured=intent["amount"] if captured else 0,
        status="succeeded",
        captured=captured,
        paid=True,
        outcome={"network_status": auth.network_status, "type": "authorized", "seller_message": "Payment complete."},
        processor_ref=auth.processor_ref,
    )
    changes = {
        "status": S.SUCCEEDED if captured else S.REQUIRES_CAPTURE,
        "amount_received": intent["amount"] if captured else 0,
        "amount_capturable": 0 if captured else intent["amount"],
        "latest_charge_id": charge["id"],
        "processor_ref": auth.processor_ref,
        **_CLEARED,
        "updated": utcnow(),
    }
    after = {**intent, **changes}
    kind = "payment_intent.succeeded" if captured else "payment_intent.amount_capturable_updated"
    writes = [
        charges.insert_write(charge),
        *ledger.capture_writes(principal, intent, charge["id"], charge["amount_captured"]),
        update_write(payment_intents, principal, intent["id"], changes),
        events.record_write(principal, "charge.succeeded", views.charge(charge, pm)),
        events.record_write(principal, kind, views.payment_intent(after)),
    ]
    return _Plan(writes, after)


async def _finish_grouped(
    ctx: PaymentsContext, principal: Principal, attempt: Attempt, outcome: Authorization | ProcessorError, rec: Recorder
) -> Finished | None:
    """The common case (an authorization, begun by this request, answered without 3-D Secure)
    committed together with other requests' (store.group). None when it must take the one-by-one
    path: another outcome, a response that needs the database to render, or an intent changed
    since this attempt began (a recovery, an update)."""
    intent, pm = attempt.intent, attempt.payment_method
    if (
        not isinstance(outcome, Authorization)
        or outcome.status is AuthorizationStatus.REQUIRES_ACTION
        or intent is None
        or pm is None
    ):
        return None
    plan = _success_plan(principal, intent, pm, outcome)
    final = rec.finish_offline(plan.intent)
    if final is None:
        return None
    # The intent exactly as this attempt left it: any other change since sends us the slow way.
    guard = Guard(
        payment_intents,
        principal.merchant_id,
        principal.livemode,
        intent["id"],
        {"pending_key": attempt.key, "updated": intent["updated"]},
    )
    if not await ctx.commits.commit([*plan.writes, *final.writes], guard):
        return None
    final.committed()
    return Finished(plan.intent, None)


def card_error(outcome: ProcessorError) -> CardError:
    decline_code = outcome.decline_code if isinstance(outcome, Declined) else "processing_error"
    if decline_code == "authentication_failure":
        return CardError(
            DECLINE_MESSAGES[decline_code], code="payment_intent_authentication_failure", decline_code=None
        )
    message = DECLINE_MESSAGES.get(decline_code, DECLINE_MESSAGES["generic_decline"])
    return CardError(message, code=DECLINE_TOP_CODES.get(decline_code, "card_declined"), decline_code=decline_code)


async def _fail(
    conn: AsyncConnection,
    principal: Principal,
    intent: RowMapping,
    pm: Row,
    outcome: ProcessorError,
    rec: Recorder,
) -> Finished:
    error = card_error(outcome)
    charge = await charges.insert(
        conn,
        principal,
        intent,
        amount_captured=0,
        status="failed",
        captured=False,
        paid=False,
        failure_code=error.code,
        failure_message=error.message,
        outcome={"network_status": "declined_by_network", "type": "issuer_declined", "reason": error.decline_code},
    )
    charge_id = charge["id"]
    last_error = {**error.as_dict(), "charge": charge_id, "payment_method": views.payment_method(pm)}
    intent = await set_intent(
        conn,
        principal,
        intent["id"],
        status=S.REQUIRES_PAYMENT_METHOD,
        payment_method_id=None,
        latest_charge_id=charge_id,
        last_payment_error=last_error,
        pending_op=None,
        pending_key=None,
        pending_amount=None,
        pending_since=None,
    )
    await events.record(conn, principal, "charge.failed", views.charge(charge, pm))
    await events.record(conn, principal, "payment_intent.payment_failed", views.payment_intent(intent))
    error.extra.update({"charge": charge_id, "payment_intent": views.payment_intent(intent)})
    await rec.finish(conn, error)
    return Finished(intent, error)
