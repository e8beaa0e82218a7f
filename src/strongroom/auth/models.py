from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    """Who is calling: a merchant in test or live mode. Every query is scoped by both."""

    merchant_id: str
    livemode: bool
    key_id: str


@dataclass(frozen=True)
class NewMerchant:
    id: str
    name: str
    secret_key: str
