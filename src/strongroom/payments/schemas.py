"""Response shapes of the payments API, for the OpenAPI document (responses are rendered by
`views.py`; schemathesis checks that every response matches these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class CustomerOut(Out):
    id: str
    object: Literal["customer"]
    deleted: bool | None = None
    email: str | None = None
    name: str | None = None
    metadata: dict[str, str] | None = None
    created: int | None = None


class CardOut(Out):
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    funding: str
    fingerprint: str


class PaymentMethodOut(Out):
    id: str
    object: Literal["payment_method"]
    type: Literal["card"]
    customer: str | None
    card: CardOut
    metadata: dict[str, str]
    created: int
    livemode: bool


class PaymentIntentOut(Out):
    id: str
    object: Literal["payment_intent"]
    amount: int
    amount_capturable: int
    amount_received: int
    currency: str
    status: Literal[
        "requires_payment_method",
        "requires_confirmation",
        "requires_action",
        "processing",
        "requires_capture",
        "succeeded",
        "canceled",
    ]
    capture_method: str
    customer: str | Any | None
    payment_method: str | Any | None
    latest_charge: str | Any | None
    last_payment_error: dict[str, Any] | None
    next_action: dict[str, Any] | None
    metadata: dict[str, str]
    created: int
    livemode: bool


class ChargeOut(Out):
    id: str
    object: Literal["charge"]
    amount: int
    amount_captured: int
    amount_refunded: int
    currency: str
    status: Literal["succeeded", "pending", "failed"]
    captured: bool
    paid: bool
    refunded: bool
    payment_intent: str


class RefundOut(Out):
    id: str
    object: Literal["refund"]
    amount: int
    currency: str
    status: Literal["pending", "succeeded", "failed", "canceled", "requires_action"]
    charge: str
    payment_intent: str
    metadata: dict[str, str]


class EventOut(Out):
    id: str
    object: Literal["event"]
    type: str
    created: int
    data: dict[str, Any]


class _ListOut(Out):
    object: Literal["list"]
    has_more: bool
    url: str


class CustomerList(_ListOut):
    data: list[CustomerOut]


class PaymentMethodList(_ListOut):
    data: list[PaymentMethodOut]


class PaymentIntentList(_ListOut):
    data: list[PaymentIntentOut]


class ChargeList(_ListOut):
    data: list[ChargeOut]


class RefundList(_ListOut):
    data: list[RefundOut]


class EventList(_ListOut):
    data: list[EventOut]
