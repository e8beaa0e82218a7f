"""Stripe-shaped JSON for the payments domain's objects (pure functions of a row).

Only brand, BIN, last4, expiry, funding and a keyed fingerprint of a card are ever rendered
(PCI DSS 3.4.1: PAN masked everywhere).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strongroom.store.db import epoch_s

ts = epoch_s
# A row as read (RowMapping) or as built before it is written (a dict with every column).
Row = Mapping[Any, Any]


def customer(row: Row) -> dict[str, Any]:
    if row["deleted"]:
        return {"id": row["id"], "object": "customer", "deleted": True}
    return {
        "id": row["id"],
        "object": "customer",
        "created": ts(row["created"]),
        "livemode": row["livemode"],
        "email": row["email"],
        "name": row["name"],
        "description": row["description"],
        "phone": row["phone"],
        "metadata": row["metadata"],
        "balance": 0,
        "currency": None,
        "delinquent": False,
        "invoice_prefix": None,
        "default_source": None,
    }


def payment_method(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "payment_method",
        "type": row["type"],
        "created": ts(row["created"]),
        "livemode": row["livemode"],
        "customer": row["customer_id"],
        "metadata": row["metadata"],
        "billing_details": row["billing_details"],
        "card": card_details(row),
    }


def card_details(row: Row) -> dict[str, Any]:
    return {
        "brand": row["card_brand"],
        "iin": row["card_bin"],
        "last4": row["card_last4"],
        "exp_month": row["card_exp_month"],
        "exp_year": row["card_exp_year"],
        "funding": row["card_funding"],
        "fingerprint": row["card_fingerprint"],
        "country": None,
        "checks": {"cvc_check": None, "address_line1_check": None, "address_postal_code_check": None},
    }


def payment_intent(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "payment_intent",
        "amount": row["amount"],
        "amount_capturable": row["amount_capturable"],
        "amount_received": row["amount_received"],
        "currency": row["currency"],
        "status": row["status"],
        "capture_method": row["capture_method"],
        "confirmation_method": row["confirmation_method"],
        "created": ts(row["created"]),
        "livemode": row["livemode"],
        "customer": row["customer_id"],
        "payment_method": row["payment_method_id"],
        "payment_method_types": ["card"],
        "description": row["description"],
        "receipt_email": row["receipt_email"],
        "statement_descriptor": row["statement_descriptor"],
        "metadata": row["metadata"],
        "last_payment_error": row["last_payment_error"],
        "next_action": row["next_action"],
        "cancellation_reason": row["cancellation_reason"],
        "canceled_at": ts(row["canceled_at"]),
        "latest_charge": row["latest_charge_id"],
        "client_secret": row["client_secret"],
    }


def charge(row: Row, card: Row | None = None) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "charge",
        "amount": row["amount"],
        "amount_captured": row["amount_captured"],
        "amount_refunded": row["amount_refunded"],
        "currency": row["currency"],
        "status": row["status"],
        "captured": row["captured"],
        "paid": row["paid"],
        "refunded": row["refunded"],
        "created": ts(row["created"]),
        "livemode": row["livemode"],
        "customer": row["customer_id"],
        "payment_intent": row["payment_intent_id"],
        "payment_method": row["payment_method_id"],
        "payment_method_details": {"type": "card", "card": card_details(card) if card else None},
        "failure_code": row["failure_code"],
        "failure_message": row["failure_message"],
        "outcome": row["outcome"],
        "metadata": {},
    }


def refund(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "refund",
        "amount": row["amount"],
        "currency": row["currency"],
        "status": row["status"],
        "reason": row["reason"],
        "failure_reason": row["failure_reason"],
        "charge": row["charge_id"],
        "payment_intent": row["payment_intent_id"],
        "created": ts(row["created"]),
        "metadata": row["metadata"],
    }
