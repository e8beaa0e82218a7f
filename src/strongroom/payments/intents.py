"""Payment intents: create, update, confirm, retrieve, list. Capture and cancel: `settle.py`."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.errors import InvalidRequest, UnexpectedState
from strongroom.events import service as events
from strongroom.idempotency.service import Recorder
from strongroom.ids import new_id
from strongroom.money import get_currency, parse_amount
from strongroom.payments import authorize, customers, methods, settle, views
from strongroom.payments.authorize import Finished
from strongroom.payments.context import PaymentsContext, load, load_one, owned
from strongroom.payments.models import IntentStatus, Operation, check_allowed
from strongroom.payments.params import IntentConfirm, IntentCreate, IntentList, IntentUpdate
from strongroom.payments.tables import payment_intents, payment_methods
from strongroom.payments.views import Row
from strongroom.store import group
from strongroom.store.db import utcnow
from strongroom.store.group import Write
from strongroom.store.paging import Page, PageRequest, fetch_page

S = IntentStatus
_INSERT = payment_intents.insert()
# Every column, as RETURNING would give it: a row built here renders like one read back.
_EMPTY: dict[str, Any] = {c.name: None for c in payment_intents.c}


def _check_methods(p: IntentCreate) -> None:
    if p.payment_method_types is not None and p.automatic_payment_methods is not None:
        raise InvalidRequest(
            "You may only specify one of these parameters: automatic_payment_methods, payment_method_types.",
            param="automatic_payment_methods",
        )
    if p.confirm and p.payment_method is None:
        raise InvalidRequest(
            "You cannot confirm this PaymentIntent because it's missing a payment method.",
            param="payment_method",
            code="payment_intent_unexpected_state",
        )


async def create(ctx: PaymentsContext, principal: Principal, p: IntentCreate, rec: Recorder) -> Finished:
    if rec.resume_id is not None:
        return await settle.resume(ctx, principal, rec.resume_id, rec)
    currency = get_currency(p.currency)
    amount = parse_amount(p.amount, currency)
    _check_methods(p)
    # What the intent refers to is read first; its own writes then commit with other requests'
    # (store.group). A test alias stores a new payment method: that needs a transaction.
    alias = p.payment_method is not None and methods.is_alias(principal, p.payment_method)
    pm: Row | None = None
    if alias:
        await rec.hold()  # storing the alias's payment method is a write of its own
    if alias or p.customer is not None:
        async with ctx.db.tx() if alias else ctx.db.single() as conn:
            if p.customer is not None:
                await customers.live(conn, principal, p.customer)
            pm = await methods.resolve(conn, ctx.vault, principal, p.payment_method) if p.payment_method else None
    elif p.payment_method is not None:
        # The common case, one lookup by key: one statement on its own (store.pg on PostgreSQL).
        pm = await load_one(
            ctx.db, payment_methods, principal, p.payment_method, "payment_method", param="payment_method"
        )
    intent = _new_intent(ctx, principal, p, amount, currency.code, pm)
    created = events.record_write(principal, "payment_intent.created", views.payment_intent(intent))
    if not p.confirm or pm is None:
        final = rec.finish_offline(intent)
        if final is None:
            async with ctx.db.tx() as conn:
                await group.execute(conn, [_insert(intent), created])
                await rec.finish(conn, intent)
        else:
            await ctx.commits.commit([_insert(intent), created, *final.writes])
            final.committed()
        return Finished(intent, None)
    # Created and confirmed at once: the row is written already processing, with the event
    # showing it as created, and the idempotency key's recovery point in the same commit.
    key, begun = authorize.begin_values(intent, pm)
    processing = {**intent, **begun}
    checkpoint = rec.checkpoint_offline(intent["id"])
    await ctx.commits.commit([_insert(processing), created, *checkpoint.writes])
    checkpoint.committed()
    return await authorize.drive(ctx, principal, authorize.Attempt(intent["id"], key, processing, pm), rec)


def _new_intent(
    ctx: PaymentsContext, principal: Principal, p: IntentCreate, amount: int, currency: str, pm: Row | None
) -> dict[str, Any]:
    intent_id = new_id("payment_intent")
    now = utcnow()
    return _EMPTY | {
        "merchant_id": principal.merchant_id,
        "id": intent_id,
        "livemode": principal.livemode,
        "created": now,
        "updated": now,
        "amount": amount,
        "currency": currency,
        "status": S.REQUIRES_CONFIRMATION if pm is not None else S.REQUIRES_PAYMENT_METHOD,
        "capture_method": p.capture_method,
        "confirmation_method": p.confirmation_method,
        "customer_id": p.customer,
        "payment_method_id": pm["id"] if pm is not None else None,
        "amount_capturable": 0,
        "amount_received": 0,
        "description": p.description,
        "receipt_email": p.receipt_email,
        "statement_descriptor": p.statement_descriptor,
        "return_url": p.return_url,
        "metadata": dict(p.metadata),
        "client_secret": f"{intent_id}_secret_{secrets.token_urlsafe(18)}",
        "connector": ctx.router.for_mode(principal.livemode).name,
        "attempt": 0,
    }


def _insert(intent: dict[str, Any]) -> Write:
    return Write(_INSERT, intent)


async def confirm(
    ctx: PaymentsContext, principal: Principal, intent_id: str, p: IntentConfirm, rec: Recorder
) -> Finished:
    if rec.resume_id == intent_id:
        return await settle.resume(ctx, principal, intent_id, rec)
    async with ctx.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", for_update=True)
        if intent["status"] == S.PROCESSING and authorize.is_stale(intent, ctx.lock_timeout_s):
            # The request that began this attempt died; finish it with the same processor key.
            attempt = authorize.Attempt(intent_id, intent["pending_key"])
        else:
            check_allowed(Operation.CONFIRM, intent["status"], intent_id)
            pm_id = p.payment_method or intent["payment_method_id"]
            if pm_id is None:
                raise InvalidRequest(
                    "You cannot confirm this PaymentIntent because it's missing a payment method. "
                    "Update the PaymentIntent with a payment method and then confirm it again.",
                    param="payment_method",
                    code="payment_intent_unexpected_state",
                )
            pm = await methods.resolve(conn, ctx.vault, principal, pm_id)
            extra: dict[str, Any] = {}
            if p.receipt_email is not None:
                extra["receipt_email"] = p.receipt_email
            if p.return_url is not None:
                extra["return_url"] = p.return_url
            if extra:
                intent = await authorize.set_intent(conn, principal, intent_id, **extra)
            attempt = await authorize.begin(conn, principal, intent, pm, rec)
    return await authorize.drive(ctx, principal, attempt, rec)


_ANNOTATIONS = frozenset({"metadata", "description", "receipt_email", "expand"})


async def update(
    ctx: PaymentsContext, principal: Principal, intent_id: str, p: IntentUpdate, rec: Recorder
) -> RowMapping:
    async with ctx.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", for_update=True)
        if p.model_fields_set - _ANNOTATIONS:
            # Only what the payment is (amount, currency, card, capture) is frozen once confirmed;
            # Stripe lets a merchant annotate an intent in any status.
            check_allowed(Operation.UPDATE, intent["status"], intent_id)
        values = await _update_values(conn, ctx, principal, intent, p)
        if values:
            intent = await authorize.set_intent(conn, principal, intent_id, **values)
        await rec.finish(conn, intent)
        return intent


async def _update_values(
    conn: AsyncConnection, ctx: PaymentsContext, principal: Principal, intent: RowMapping, p: IntentUpdate
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    # Nullable fields: an explicit null clears them.
    for field in ("description", "receipt_email", "statement_descriptor"):
        if field in p.model_fields_set:
            values[field] = getattr(p, field)
    # capture_method is NOT NULL: a JSON null leaves it unchanged, like amount and currency.
    if p.capture_method is not None:
        values["capture_method"] = p.capture_method
    currency = get_currency(p.currency) if p.currency is not None else get_currency(intent["currency"])
    if p.currency is not None:
        values["currency"] = currency.code
    if p.amount is not None or p.currency is not None:
        values["amount"] = parse_amount(p.amount if p.amount is not None else intent["amount"], currency)
    if p.customer is not None:
        await customers.live(conn, principal, p.customer)
        values["customer_id"] = p.customer
    if p.payment_method is not None:
        pm = await methods.resolve(conn, ctx.vault, principal, p.payment_method)
        values["payment_method_id"] = pm["id"]
        if intent["status"] == S.REQUIRES_PAYMENT_METHOD:
            values["status"] = S.REQUIRES_CONFIRMATION
    if p.metadata is not None:
        values["metadata"] = customers.merge_metadata(intent["metadata"], dict(p.metadata))
    if intent["status"] == S.REQUIRES_ACTION and values.keys() & {"amount", "currency", "payment_method_id"}:
        raise UnexpectedState(
            "You cannot change the amount, currency or payment method of a PaymentIntent that requires action.",
        )
    return values


async def retrieve(conn: AsyncConnection, principal: Principal, intent_id: str) -> RowMapping:
    return await load(conn, payment_intents, principal, intent_id, "payment_intent")


async def list_intents(conn: AsyncConnection, principal: Principal, p: IntentList) -> Page:
    scope = owned(payment_intents, principal)
    if p.customer is not None:
        scope.append(payment_intents.c.customer_id == p.customer)
    return await fetch_page(conn, payment_intents, scope, PageRequest(p.limit, p.starting_after, p.ending_before))
