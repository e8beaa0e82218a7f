"""Prefixed random identifiers (cus_, pm_, pi_, ch_, re_, evt_, …) like Stripe's.

Ids are 24 characters of base62 after the prefix: ~143 bits from `secrets`, so they are
unguessable and carry no sequence (ARCHITECTURE: no sequential ids in URLs).
"""

from __future__ import annotations

import secrets
from typing import NewType

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LENGTH = 24

MerchantId = NewType("MerchantId", str)
CustomerId = NewType("CustomerId", str)
PaymentMethodId = NewType("PaymentMethodId", str)
PaymentIntentId = NewType("PaymentIntentId", str)
ChargeId = NewType("ChargeId", str)
RefundId = NewType("RefundId", str)
EventId = NewType("EventId", str)

PREFIXES = {
    "merchant": "acct_",
    "customer": "cus_",
    "payment_method": "pm_",
    "payment_intent": "pi_",
    "charge": "ch_",
    "refund": "re_",
    "event": "evt_",
    "balance_transaction": "txn_",
    "api_key": "key_",
    "card": "card_",
    "reconciliation": "recon_",
}


def random_part(length: int = _LENGTH) -> str:
    # One call to the OS CSPRNG per id (not one per character): base62 digits of a random integer
    # with 6 bits per character to spare, so every digit is (near-)uniform.
    n = int.from_bytes(secrets.token_bytes(length), "big")
    digits = []
    for _ in range(length):
        n, r = divmod(n, 62)
        digits.append(_ALPHABET[r])
    return "".join(digits)


def new_id(kind: str) -> str:
    return PREFIXES[kind] + random_part()


def has_prefix(value: str, kind: str) -> bool:
    return value.startswith(PREFIXES[kind])
