"""Request parameters of the payments API, validated strictly (unknown parameters are refused).

Values arrive as strings from form bodies and as JSON types from JSON bodies; the validators
here accept both but never a float where an integer is meant.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator
from pydantic.json_schema import SkipJsonSchema

from strongroom.errors import InvalidRequest, MissingParameter, UnknownParameter
from strongroom.money import parse_integer

METADATA_KEYS_MAX = 50


def _integer(value: object) -> int:
    try:
        return parse_integer(value, "value")
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None


def _metadata(value: object) -> object:
    if value == "":
        return {}  # Stripe: an empty string unsets all metadata
    if isinstance(value, list):
        # The bracket encoding cannot tell metadata[0]=a from a list: all-digit keys read as one.
        value = {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict) and len(value) > METADATA_KEYS_MAX:
        raise ValueError(f"Metadata may have at most {METADATA_KEYS_MAX} keys.")
    return value


Integer = Annotated[int, BeforeValidator(_integer)]
Text = Annotated[str, StringConstraints(max_length=5000)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_]+$")]
_ID_RE = re.compile(r"[A-Za-z0-9_]{1,64}")
Email = Annotated[str, StringConstraints(max_length=512)]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=40)]
MetadataValue = Annotated[str, StringConstraints(max_length=500)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], BeforeValidator(_metadata)]
Expand = Annotated[list[Annotated[str, StringConstraints(max_length=100)]], Field(max_length=10)]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=5000)


class ListParams(Params):
    limit: Annotated[Integer, Field(ge=1, le=100)] = 10
    starting_after: Id | None = None
    ending_before: Id | None = None
    expand: Expand = []
    created: Any = None  # accepted like Stripe's, filtering by creation time is not offered yet


class Address(Params):
    line1: Text | None = None
    line2: Text | None = None
    city: Text | None = None
    state: Text | None = None
    postal_code: Text | None = None
    country: Annotated[str, StringConstraints(max_length=2)] | None = None


class BillingDetails(Params):
    name: Text | None = None
    email: Email | None = None
    phone: Text | None = None
    address: Address | None = None


class CustomerCreate(Params):
    email: Email | None = None
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    description: Annotated[str, StringConstraints(max_length=1000)] | None = None
    phone: Annotated[str, StringConstraints(max_length=64)] | None = None
    metadata: Metadata = {}
    payment_method: Id | None = None
    expand: Expand = []


class CustomerUpdate(CustomerCreate):
    """Stripe accepts the same fields on update as on create."""


class CustomerList(ListParams):
    email: Email | None = None


class Card(Params):
    number: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    exp_month: Integer
    exp_year: Integer
    cvc: Annotated[str, StringConstraints(max_length=8)] | None = None


class PaymentMethodCreate(Params):
    type: Literal["card"]
    # The card's details, or Stripe's `card[token]=tok_…` (a token from POST /v1/tokens), which is
    # read into `card_token` before validation so each form keeps Stripe's parameter names in errors.
    card: Card | None = None
    card_token: SkipJsonSchema[str | None] = None
    billing_details: BillingDetails | None = None
    metadata: Metadata = {}
    expand: Expand = []

    @model_validator(mode="before")
    @classmethod
    def _card_token(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "card_token" in data:
            raise UnknownParameter("card_token")
        card = data.get("card")
        if not isinstance(card, dict) or "token" not in card:
            return data
        extra = sorted(name for name in card if name != "token")
        if extra:
            raise UnknownParameter(f"card[{extra[0]}]")
        token = card["token"]
        if not isinstance(token, str) or not _ID_RE.fullmatch(token):
            raise InvalidRequest("Invalid card[token]: not a token id.", param="card[token]")
        return {**{k: v for k, v in data.items() if k != "card"}, "card_token": token}

    @model_validator(mode="after")
    def _card_or_token(self) -> PaymentMethodCreate:
        if self.card is None and self.card_token is None:
            raise MissingParameter("card")
        return self

    def require_card(self) -> Card:
        if self.card is None:
            raise MissingParameter("card")
        return self.card


class PaymentMethodUpdate(Params):
    billing_details: BillingDetails | None = None
    metadata: Metadata | None = None
    expand: Expand = []


class PaymentMethodAttach(Params):
    customer: Id
    expand: Expand = []


class PaymentMethodDetach(Params):
    expand: Expand = []


class PaymentMethodList(ListParams):
    customer: Id | None = None
    type: Literal["card"] | None = None


class AutomaticPaymentMethods(Params):
    enabled: bool
    allow_redirects: Literal["always", "never"] | None = None


class IntentCreate(Params):
    amount: Integer
    currency: Annotated[str, StringConstraints(max_length=3)]
    customer: Id | None = None
    payment_method: Id | None = None
    payment_method_types: list[Literal["card"]] | None = None
    automatic_payment_methods: AutomaticPaymentMethods | None = None
    confirm: bool = False
    capture_method: Literal["automatic", "automatic_async", "manual"] = "automatic"
    confirmation_method: Literal["automatic", "manual"] = "automatic"
    description: Annotated[str, StringConstraints(max_length=1000)] | None = None
    receipt_email: Email | None = None
    statement_descriptor: Annotated[str, StringConstraints(max_length=22)] | None = None
    metadata: Metadata = {}
    return_url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    expand: Expand = []


class IntentUpdate(Params):
    amount: Integer | None = None
    currency: Annotated[str, StringConstraints(max_length=3)] | None = None
    customer: Id | None = None
    payment_method: Id | None = None
    capture_method: Literal["automatic", "automatic_async", "manual"] | None = None
    description: Annotated[str, StringConstraints(max_length=1000)] | None = None
    receipt_email: Email | None = None
    statement_descriptor: Annotated[str, StringConstraints(max_length=22)] | None = None
    metadata: Metadata | None = None
    expand: Expand = []


class IntentConfirm(Params):
    payment_method: Id | None = None
    return_url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    receipt_email: Email | None = None
    expand: Expand = []


class IntentCapture(Params):
    amount_to_capture: Integer | None = None
    expand: Expand = []


class IntentCancel(Params):
    cancellation_reason: Literal["duplicate", "fraudulent", "requested_by_customer", "abandoned"] | None = None
    expand: Expand = []


class IntentList(ListParams):
    customer: Id | None = None


class RefundCreate(Params):
    payment_intent: Id | None = None
    charge: Id | None = None
    amount: Integer | None = None
    reason: Literal["duplicate", "fraudulent", "requested_by_customer"] | None = None
    metadata: Metadata = {}
    expand: Expand = []


class RefundUpdate(Params):
    metadata: Metadata | None = None
    expand: Expand = []


class RefundList(ListParams):
    payment_intent: Id | None = None
    charge: Id | None = None


class ChargeList(ListParams):
    payment_intent: Id | None = None
    customer: Id | None = None


class EventList(ListParams):
    type: Annotated[str, StringConstraints(max_length=100)] | None = None


class Retrieve(Params):
    expand: Expand = []
