"""Card payment methods. The card number goes to the vault; this domain keeps only the token and
the card's non-sensitive facts."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.connectors.base import CardRef
from strongroom.connectors.sandbox.cards import detect_brand, funding_for, luhn_valid
from strongroom.errors import CardError, InvalidRequest
from strongroom.events import service as events
from strongroom.idempotency.service import Recorder
from strongroom.ids import new_id
from strongroom.payments import customers as customers_service
from strongroom.payments import tokens, views
from strongroom.payments.context import load, owned
from strongroom.payments.params import (
    Card,
    PaymentMethodAttach,
    PaymentMethodCreate,
    PaymentMethodList,
    PaymentMethodUpdate,
)
from strongroom.payments.sandbox_aliases import ALIASES
from strongroom.payments.tables import payment_methods
from strongroom.payments.tokens import CardFacts, card_columns
from strongroom.payments.views import Row
from strongroom.sensitive import Secret
from strongroom.store.db import utcnow
from strongroom.store.paging import Page, PageRequest, fetch_page
from strongroom.vault.interface import CardVault

_CARD_DIGITS = range(12, 20)


def _card_error(message: str, code: str, param: str) -> CardError:
    return CardError(message, code=code, param=param)


def validate_card(card: Card, today: dt.date) -> tuple[Secret[str], Secret[str] | None, int]:
    """Checks a card as Stripe does; returns the number, CVC and four-digit expiry year."""
    number = card.number.replace(" ", "").replace("-", "")
    if not number.isascii() or not number.isdigit() or len(number) not in _CARD_DIGITS:
        raise _card_error("Your card number is incorrect.", "invalid_number", "card[number]")
    if not luhn_valid(number):
        raise _card_error("Your card number is incorrect.", "incorrect_number", "card[number]")
    if not 1 <= card.exp_month <= 12:
        raise _card_error("Your card's expiration month is invalid.", "invalid_expiry_month", "card[exp_month]")
    year = card.exp_year + 2000 if card.exp_year < 100 else card.exp_year
    if year > today.year + 50 or (year, card.exp_month) < (today.year, today.month):
        raise _card_error("Your card's expiration year is invalid.", "invalid_expiry_year", "card[exp_year]")
    cvc = None
    if card.cvc is not None:
        wanted = 4 if detect_brand(number) == "amex" else 3
        if not card.cvc.isascii() or not card.cvc.isdigit() or len(card.cvc) != wanted:
            raise _card_error("Your card's security code is invalid.", "invalid_cvc", "card[cvc]")
        cvc = Secret(card.cvc)
    return Secret(number), cvc, year


async def create(
    conn: AsyncConnection, vault: CardVault, principal: Principal, p: PaymentMethodCreate, rec: Recorder
) -> RowMapping:
    if p.card_token is not None:
        # Stripe's `card[token]=tok_…`: the card was tokenized earlier (POST /v1/tokens); the token is spent here.
        facts = await tokens.consume(conn, principal, p.card_token)
        row = await insert_card_method(conn, principal, facts, p)
    else:
        card = p.require_card()
        number, cvc, year = validate_card(card, utcnow().date())
        row = await _store(conn, vault, principal, number, cvc, card.exp_month, year, p)
    await rec.finish(conn, row)
    return row


async def tokenize_card(
    conn: AsyncConnection,
    vault: CardVault,
    merchant_id: str,
    number: Secret[str],
    cvc: Secret[str] | None,
    exp_month: int,
    exp_year: int,
) -> CardFacts:
    """Stores the card in the vault; returns what the payments domain may keep of it."""
    stored = await vault.tokenize(conn, merchant_id, number, cvc)
    pan = number.reveal()
    return CardFacts(
        brand=detect_brand(pan),
        # BIN: 8 digits for 16-digit PANs, else 6 (PCI DSS 3.4.1 display limits).
        bin=pan[:8] if len(pan) == 16 else pan[:6],
        last4=pan[-4:],
        exp_month=exp_month,
        exp_year=exp_year,
        funding=funding_for(pan),
        fingerprint=stored.fingerprint,
        vault_token=stored.token,
    )


async def _store(
    conn: AsyncConnection,
    vault: CardVault,
    principal: Principal,
    number: Secret[str],
    cvc: Secret[str] | None,
    exp_month: int,
    exp_year: int,
    p: PaymentMethodCreate | None,
) -> RowMapping:
    facts = await tokenize_card(conn, vault, principal.merchant_id, number, cvc, exp_month, exp_year)
    return await insert_card_method(conn, principal, facts, p)


async def insert_card_method(
    conn: AsyncConnection, principal: Principal, facts: CardFacts, p: PaymentMethodCreate | None
) -> RowMapping:
    pm_id = new_id("payment_method")
    billing: dict[str, Any] = {"name": None, "email": None, "phone": None, "address": None}
    if p is not None and p.billing_details is not None:
        billing.update(p.billing_details.model_dump(exclude_unset=True))
    await conn.execute(
        payment_methods.insert().values(
            merchant_id=principal.merchant_id,
            id=pm_id,
            livemode=principal.livemode,
            created=utcnow(),
            type="card",
            customer_id=None,
            **card_columns(facts),
            billing_details=billing,
            metadata=dict(p.metadata) if p is not None else {},
        )
    )
    return await load(conn, payment_methods, principal, pm_id, "payment_method")


async def resolve(
    conn: AsyncConnection, vault: CardVault, principal: Principal, pm_id: str, *, param: str = "payment_method"
) -> RowMapping:
    """A payment method referenced by another request; Stripe's test aliases work in test mode
    (each use stores a new payment method)."""
    if is_alias(principal, pm_id):
        number = ALIASES[pm_id]
        today = utcnow().date()
        return await _store(conn, vault, principal, Secret(number), None, 12, today.year + 3, None)
    return await load(conn, payment_methods, principal, pm_id, "payment_method", param=param)


def is_alias(principal: Principal, pm_id: str) -> bool:
    return not principal.livemode and pm_id in ALIASES


def card_ref(row: Row) -> CardRef:
    return CardRef(
        merchant_id=row["merchant_id"],
        token=row["vault_token"],
        brand=row["card_brand"],
        bin=row["card_bin"][:6],
        last4=row["card_last4"],
        exp_month=row["card_exp_month"],
        exp_year=row["card_exp_year"],
    )


async def retrieve(conn: AsyncConnection, principal: Principal, pm_id: str) -> RowMapping:
    return await load(conn, payment_methods, principal, pm_id, "payment_method")


async def update(
    conn: AsyncConnection, principal: Principal, pm_id: str, p: PaymentMethodUpdate, rec: Recorder
) -> RowMapping:
    row = await retrieve(conn, principal, pm_id)
    values: dict[str, Any] = {}
    if p.metadata is not None:
        values["metadata"] = customers_service.merge_metadata(row["metadata"], dict(p.metadata))
    if p.billing_details is not None:
        values["billing_details"] = {**row["billing_details"], **p.billing_details.model_dump(exclude_unset=True)}
    return await _set(conn, principal, pm_id, values, "payment_method.updated", rec)


async def attach(
    conn: AsyncConnection,
    principal: Principal,
    pm_id: str,
    p: PaymentMethodAttach,
    rec: Recorder,
    *,
    pm_param: str = "id",
) -> RowMapping:
    """`pm_param` names the payment method in a 404: "id" on its own route, the referring field elsewhere."""
    row = await load(conn, payment_methods, principal, pm_id, "payment_method", param=pm_param)
    await customers_service.live(conn, principal, p.customer)
    if row["customer_id"] not in (None, p.customer):
        raise InvalidRequest(
            "This PaymentMethod is already attached to another customer.",
            code="payment_method_unexpected_state",
        )
    return await _set(conn, principal, pm_id, {"customer_id": p.customer}, "payment_method.attached", rec)


async def detach(conn: AsyncConnection, principal: Principal, pm_id: str, rec: Recorder) -> RowMapping:
    row = await retrieve(conn, principal, pm_id)
    if row["customer_id"] is None:
        raise InvalidRequest(
            "The payment method you provided is not attached to a customer so detachment is impossible.",
            code="payment_method_unexpected_state",
        )
    return await _set(conn, principal, pm_id, {"customer_id": None}, "payment_method.detached", rec)


async def _set(
    conn: AsyncConnection, principal: Principal, pm_id: str, values: dict[str, Any], event: str, rec: Recorder
) -> RowMapping:
    if values:
        where = [*owned(payment_methods, principal), payment_methods.c.id == pm_id]
        await conn.execute(payment_methods.update().where(*where).values(**values))
    row = await retrieve(conn, principal, pm_id)
    await events.record(conn, principal, event, views.payment_method(row))
    await rec.finish(conn, row)
    return row


async def list_methods(conn: AsyncConnection, principal: Principal, p: PaymentMethodList) -> Page:
    scope = owned(payment_methods, principal)
    if p.customer is not None:
        await customers_service.retrieve(conn, principal, p.customer, param="customer")
        scope.append(payment_methods.c.customer_id == p.customer)
    page = PageRequest(p.limit, p.starting_after, p.ending_before)
    return await fetch_page(conn, payment_methods, scope, page)
