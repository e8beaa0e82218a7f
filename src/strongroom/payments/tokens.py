"""Card tokens (Stripe's `POST /v1/tokens`): a card tokenized once, spent once.

A token is a handle on a card already in the vault, with the card's non-sensitive facts. It is
spent by creating a payment method from it (`card[token]=tok_…`), which gets the same vault
token: the card is not encrypted twice, and a CVC given with the token (held in memory by the
vault) reaches the first authorization of that payment method.

Tokens have their own table rather than rows in `payment_methods`: they are single use and
carry the client's IP, which a payment method has no column for, and every query on payment
methods (lists, retrieval, attach, charging) would otherwise need to exclude them. A query that
forgot to would make a token chargeable without being spent — a failure that stays silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.errors import InvalidRequest
from strongroom.ids import random_part
from strongroom.payments.context import load, owned
from strongroom.store.db import epoch_s, utcnow
from strongroom.store.metadata import Timestamp, metadata

TOKEN_PREFIX = "tok_"  # noqa: S105 (an id prefix, not a secret)

card_tokens = sa.Table(
    "card_tokens",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("livemode", sa.Boolean, nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False),
    # Stripe's `client_ip`: IPv6 text is at most 45 characters.
    sa.Column("client_ip", sa.String(45)),
    sa.Column("card_brand", sa.String(32), nullable=False),
    sa.Column("card_bin", sa.String(8), nullable=False),
    sa.Column("card_last4", sa.String(4), nullable=False),
    sa.Column("card_exp_month", sa.Integer, nullable=False),
    sa.Column("card_exp_year", sa.Integer, nullable=False),
    sa.Column("card_funding", sa.String(16), nullable=False),
    sa.Column("card_fingerprint", sa.String(64), nullable=False),
    sa.Column("vault_token", sa.String(64), nullable=False),
)

# Stripe's legacy Card object names brands for display, unlike a PaymentMethod's lowercase codes.
_DISPLAY_BRANDS = {
    "amex": "American Express",
    "diners": "Diners Club",
    "discover": "Discover",
    "eftpos_au": "Eftpos Australia",
    "jcb": "JCB",
    "mastercard": "MasterCard",
    "unionpay": "UnionPay",
    "visa": "Visa",
}


@dataclass(frozen=True)
class CardFacts:
    """What the payments domain may keep of a card: the vault's token and the masked facts."""

    brand: str
    bin: str
    last4: str
    exp_month: int
    exp_year: int
    funding: str
    fingerprint: str
    vault_token: str


def card_columns(facts: CardFacts) -> dict[str, Any]:
    """The stored card facts, as the payment-method and token tables both name them."""
    return {
        "card_brand": facts.brand,
        "card_bin": facts.bin,
        "card_last4": facts.last4,
        "card_exp_month": facts.exp_month,
        "card_exp_year": facts.exp_year,
        "card_funding": facts.funding,
        "card_fingerprint": facts.fingerprint,
        "vault_token": facts.vault_token,
    }


async def create(conn: AsyncConnection, principal: Principal, facts: CardFacts, client_ip: str | None) -> RowMapping:
    token_id = TOKEN_PREFIX + random_part()
    await conn.execute(
        card_tokens.insert().values(
            merchant_id=principal.merchant_id,
            id=token_id,
            livemode=principal.livemode,
            created=utcnow(),
            used=False,
            client_ip=client_ip,
            **card_columns(facts),
        )
    )
    return await retrieve(conn, principal, token_id)


async def retrieve(conn: AsyncConnection, principal: Principal, token_id: str, *, param: str = "id") -> RowMapping:
    return await load(conn, card_tokens, principal, token_id, "token", param=param)


async def consume(conn: AsyncConnection, principal: Principal, token_id: str) -> CardFacts:
    """Spends the token in the caller's transaction (rolled back with it if the caller fails).

    The conditional UPDATE is the single-use guarantee: of two concurrent requests spending one
    token, the second finds `used` already true once the first commits (PostgreSQL row lock)."""
    spend = (
        card_tokens.update()
        .where(*owned(card_tokens, principal), card_tokens.c.id == token_id, card_tokens.c.used.is_(False))
        .values(used=True)
        .returning(*card_tokens.c)
    )
    row = (await conn.execute(spend)).mappings().first()
    if row is None:
        await retrieve(conn, principal, token_id, param="card[token]")  # 404 for none, or another merchant's
        raise InvalidRequest(
            f"You cannot use a token more than once: {token_id}.", code="token_already_used", param="card[token]"
        )
    return CardFacts(
        brand=row["card_brand"],
        bin=row["card_bin"],
        last4=row["card_last4"],
        exp_month=row["card_exp_month"],
        exp_year=row["card_exp_year"],
        funding=row["card_funding"],
        fingerprint=row["card_fingerprint"],
        vault_token=row["vault_token"],
    )


def view(row: RowMapping) -> dict[str, Any]:
    """Stripe's token object; the card shows only brand, last 4, expiry, funding and fingerprint."""
    return {
        "id": row["id"],
        "object": "token",
        "type": "card",
        "card": {
            "object": "card",
            "brand": _DISPLAY_BRANDS.get(row["card_brand"], "Unknown"),
            "last4": row["card_last4"],
            "exp_month": row["card_exp_month"],
            "exp_year": row["card_exp_year"],
            "funding": row["card_funding"],
            "fingerprint": row["card_fingerprint"],
            "country": None,
            "cvc_check": None,
        },
        "client_ip": row["client_ip"],
        "created": epoch_s(row["created"]),
        "livemode": row["livemode"],
        "used": row["used"],
    }
